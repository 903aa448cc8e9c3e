#include "plan/layout.h"

#include <algorithm>

#include "kernels/kernel.h"

namespace uaa::detail {
namespace {

using Wide = __int128;  // work sums: heads x rows x keys can pass 2^63 before the division by P

// Work of global query rows [0, n): the sum over rows of (keys the row sees + 1). The +1 keeps
// rows that see no key from being free (they still write a row) and every weight positive.
Wide row_work_prefix(std::int64_t n, const WorkInput& in) {
  if (n <= 0) return 0;
  return n + visible_key_pairs(0, n, in.q_total, in.kv_total, in.causal);
}

struct Cut {
  std::int64_t head = 0, row = 0;
};

}  // namespace

Wide visible_key_pairs(std::int64_t first, std::int64_t n, std::int64_t q_total,
                       std::int64_t kv_total, bool causal) {
  if (n <= 0 || kv_total <= 0) return 0;
  if (!causal) return static_cast<Wide>(n) * kv_total;
  // Row i sees clamp(i + c, 0, kv_total) keys: a clipped arithmetic series.
  const std::int64_t c = kv_total - q_total + 1;
  const std::int64_t lo = std::max(first, 1 - c);               // first row that sees any key
  const std::int64_t hi = std::min(first + n, kv_total - c);    // rows below see fewer than all
  Wide pairs = 0;
  if (hi > lo) pairs += static_cast<Wide>(lo + c + hi - 1 + c) * (hi - lo) / 2;
  const std::int64_t full = std::max(first, kv_total - c);      // rows from here see all keys
  if (first + n > full) pairs += static_cast<Wide>(first + n - full) * kv_total;
  return pairs;
}

WorkInput work_input(const LayoutInput& in) {
  WorkInput w;
  w.q_heads = in.q_heads;
  w.kv_heads = in.kv_heads;
  for (std::int64_t x : in.q_lens) w.q_total += x;
  for (std::int64_t x : in.kv_lens) w.kv_total += x;
  w.causal = in.causal;
  w.ranks = static_cast<int>(in.q_lens.size());
  return w;
}

std::vector<RankWork> split_work(const WorkInput& in) {
  const int P = in.ranks;
  const std::int64_t H = in.q_heads, S = in.q_total, g = kQueryRowGranule;
  std::vector<Cut> cut(P + 1);
  if (S > 0 && H > 0) {
    cut[P] = {H, 0};
    const Wide per_head = row_work_prefix(S, in), total = per_head * H;
    const std::int64_t granules = (S + g - 1) / g;
    for (int r = 1; r < P; ++r) {
      const Wide target = total * r / P;
      const auto h = static_cast<std::int64_t>(target / per_head);
      const Wide rest = target - per_head * h;
      if (h >= H) {
        cut[r] = {H, 0};
        continue;
      }
      // The first granule boundary at or past the target: exact head boundaries stay exact.
      std::int64_t lo = 0, hi = granules;
      while (lo < hi) {
        const std::int64_t mid = lo + (hi - lo) / 2;
        if (row_work_prefix(std::min(mid * g, S), in) >= rest) hi = mid;
        else lo = mid + 1;
      }
      const std::int64_t row = std::min(lo * g, S);
      cut[r] = row == S ? Cut{h + 1, 0} : Cut{h, row};
    }
  }
  std::vector<RankWork> work(P);
  const std::int64_t group = in.kv_heads > 0 ? H / in.kv_heads : 1;
  for (int r = 0; r < P; ++r) {
    RankWork& w = work[r];
    const Cut a = cut[r], b = cut[r + 1];
    w.first_head = a.head;
    w.first_row = a.row;
    w.end_head = b.head;
    w.end_row = b.row;
    auto add = [&](std::int64_t h0, std::int64_t h1, std::int64_t r0, std::int64_t r1) {
      w.piece[w.pieces++] = WorkPiece{{h0, h1}, {r0, r1}};
    };
    if (a.head == b.head) {
      if (b.row > a.row) add(a.head, a.head + 1, a.row, b.row);
    } else {
      std::int64_t whole = a.head;
      if (a.row > 0) add(a.head, ++whole, a.row, S);
      if (b.head > whole) add(whole, b.head, 0, S);
      if (b.row > 0) add(b.head, b.head + 1, 0, b.row);
    }
    if (w.pieces > 0) {
      w.q_heads = {w.piece[0].heads.begin, w.piece[w.pieces - 1].heads.end};
      w.kv_heads = {w.q_heads.begin / group, (w.q_heads.end - 1) / group + 1};
    }
  }
  return work;
}

RankWork uniform_work(std::int64_t q_heads, std::int64_t rows, std::int64_t kv_heads) {
  RankWork w;
  if (q_heads > 0) w.piece[w.pieces++] = WorkPiece{{0, q_heads}, {0, rows}};
  w.q_heads = {0, q_heads};
  w.kv_heads = {0, kv_heads};
  return w;
}

QkvBlock qkv_block(RowRange tokens, std::int64_t kv_tokens, const RankWork& work,
                   std::int64_t row_bytes) {
  QkvBlock b;
  std::int64_t at = 0;
  for (int i = 0; i < kMaxPieces; ++i) {
    b.q[i] = at;
    if (i < work.pieces) {
      const WorkPiece& p = work.piece[i];
      at += align_up(rows_held(p, tokens).size() * p.heads.size() * row_bytes, kBlockAlign);
    }
  }
  b.k = at;
  const std::int64_t kv_bytes = kv_tokens * work.kv_heads.size() * row_bytes;
  b.v = b.k + align_up(kv_bytes, kBlockAlign);
  b.bytes = b.v + kv_bytes;
  return b;
}

OutBlock out_block(RowRange tokens, const RankWork& work, std::int64_t row_bytes, bool with_lse) {
  OutBlock b;
  std::int64_t at = 0, end = 0;  // end: past the last byte of the last part (no trailing padding)
  for (int i = 0; i < kMaxPieces; ++i) {
    b.o[i] = at;
    if (i < work.pieces) {
      const WorkPiece& p = work.piece[i];
      end = at + rows_held(p, tokens).size() * p.heads.size() * row_bytes;
      at = align_up(end, kBlockAlign);
    }
  }
  for (int i = 0; i < kMaxPieces; ++i) {
    b.lse[i] = at;
    if (with_lse && i < work.pieces) {
      const WorkPiece& p = work.piece[i];
      end = at + rows_held(p, tokens).size() * p.heads.size() *
                     static_cast<std::int64_t>(sizeof(float));
      at = align_up(end, kBlockAlign);
    }
  }
  b.bytes = end;
  return b;
}

namespace {

// Lays the peer blocks one after another, each starting on a kBlockAlign boundary.
void place(ExchangeSide& side, const std::vector<std::int64_t>& bytes) {
  side.counts = bytes;
  side.displs.assign(bytes.size(), 0);
  std::int64_t at = 0;
  for (std::size_t j = 0; j < bytes.size(); ++j) {
    side.displs[j] = at;
    at += align_up(bytes[j], kBlockAlign);
  }
  side.total = at;
}

std::vector<std::int64_t> prefix(const std::vector<std::int64_t>& lens) {
  std::vector<std::int64_t> start(lens.size() + 1, 0);
  for (std::size_t j = 0; j < lens.size(); ++j) start[j + 1] = start[j] + lens[j];
  return start;
}

}  // namespace

Layout compute_layout(const LayoutInput& in) {
  Layout L;
  L.ranks = static_cast<int>(in.q_lens.size());
  L.rank = in.rank;
  L.q_start = prefix(in.q_lens);
  L.kv_start = prefix(in.kv_lens);
  L.work = split_work(work_input(in));
  const int r = in.rank;
  const std::int64_t row = in.head_dim * in.elem_bytes;
  std::vector<std::int64_t> qs(L.ranks, 0), qr(L.ranks, 0), os(L.ranks, 0), orr(L.ranks, 0);
  L.qkv_send_block.resize(L.ranks);
  L.qkv_recv_block.resize(L.ranks);
  L.out_send_block.resize(L.ranks);
  L.out_recv_block.resize(L.ranks);
  for (int j = 0; j < L.ranks; ++j) {
    if (j == r) continue;  // the own block is read and written in place
    L.qkv_send_block[j] = qkv_block(L.q_tokens(r), in.kv_lens[r], L.work[j], row);
    L.qkv_recv_block[j] = qkv_block(L.q_tokens(j), in.kv_lens[j], L.work[r], row);
    L.out_send_block[j] = out_block(L.q_tokens(j), L.work[r], row, in.with_lse);
    L.out_recv_block[j] = out_block(L.q_tokens(r), L.work[j], row, in.with_lse);
    qs[j] = L.qkv_send_block[j].bytes;
    qr[j] = L.qkv_recv_block[j].bytes;
    os[j] = L.out_send_block[j].bytes;
    orr[j] = L.out_recv_block[j].bytes;
  }
  L.out_displ_at_peer.assign(L.ranks, 0);
  for (int j = 0; j < L.ranks; ++j) {
    if (j == r) continue;
    std::int64_t at = 0;  // j's out_send buffer: blocks by destination k, as place() lays them
    for (int k = 0; k < r; ++k)
      if (k != j) at += align_up(out_block(L.q_tokens(k), L.work[j], row, in.with_lse).bytes, kBlockAlign);
    L.out_displ_at_peer[j] = at;
  }
  place(L.qkv_send, qs);
  place(L.qkv_recv, qr);
  place(L.out_send, os);
  place(L.out_recv, orr);
  for (int j = 0; j < L.ranks; ++j) {
    const ExchangeTotals t = j == r ? ExchangeTotals{L.qkv_send.total, L.qkv_recv.total,
                                                     L.out_send.total, L.out_recv.total}
                                    : exchange_totals(in, L.q_start, L.work, j);
    L.qkv_max_total = std::max({L.qkv_max_total, t.qkv_send, t.qkv_recv});
    L.out_max_total = std::max({L.out_max_total, t.out_send, t.out_recv});
  }
  return L;
}

ExchangeTotals exchange_totals(const LayoutInput& in, const std::vector<std::int64_t>& q_start,
                               const std::vector<RankWork>& work, int r) {
  const int P = static_cast<int>(in.q_lens.size());
  const std::int64_t row = in.head_dim * in.elem_bytes;
  auto tokens = [&](int j) { return RowRange{q_start[j], q_start[j + 1]}; };
  ExchangeTotals t;
  for (int j = 0; j < P; ++j) {
    if (j == r) continue;
    t.qkv_send += align_up(qkv_block(tokens(r), in.kv_lens[r], work[j], row).bytes, kBlockAlign);
    t.qkv_recv += align_up(qkv_block(tokens(j), in.kv_lens[j], work[r], row).bytes, kBlockAlign);
    t.out_send += align_up(out_block(tokens(j), work[r], row, in.with_lse).bytes, kBlockAlign);
    t.out_recv += align_up(out_block(tokens(r), work[j], row, in.with_lse).bytes, kBlockAlign);
  }
  return t;
}

}  // namespace uaa::detail
