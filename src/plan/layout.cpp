#include "plan/layout.h"

#include <algorithm>

namespace uaa::detail {

HeadRange q_heads_of(std::int64_t q_heads, int ranks, int rank) {
  const std::int64_t base = q_heads / ranks, extra = q_heads % ranks;
  const std::int64_t begin = rank * base + (rank < extra ? rank : extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

HeadRange kv_heads_of(std::int64_t q_heads, std::int64_t kv_heads, int ranks, int rank) {
  const HeadRange q = q_heads_of(q_heads, ranks, rank);
  if (q.size() == 0) return {0, 0};
  const std::int64_t group = q_heads / kv_heads;
  return {q.begin / group, (q.end - 1) / group + 1};
}

QkvBlock qkv_block(std::int64_t q_tokens, std::int64_t kv_tokens, std::int64_t q_heads,
                   std::int64_t kv_heads, std::int64_t row_bytes) {
  QkvBlock b;
  b.q = 0;
  b.k = b.q + align_up(q_tokens * q_heads * row_bytes, kBlockAlign);
  const std::int64_t kv_bytes = kv_tokens * kv_heads * row_bytes;
  b.v = b.k + align_up(kv_bytes, kBlockAlign);
  b.bytes = b.v + kv_bytes;
  return b;
}

OutBlock out_block(std::int64_t tokens, std::int64_t heads, std::int64_t row_bytes, bool with_lse) {
  OutBlock b;
  const std::int64_t o_bytes = tokens * heads * row_bytes;
  if (!with_lse) return {o_bytes, o_bytes};
  b.lse = align_up(o_bytes, kBlockAlign);
  b.bytes = b.lse + tokens * heads * static_cast<std::int64_t>(sizeof(float));
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
  for (int j = 0; j < L.ranks; ++j) {
    L.q_heads.push_back(q_heads_of(in.q_heads, L.ranks, j));
    L.kv_heads.push_back(kv_heads_of(in.q_heads, in.kv_heads, L.ranks, j));
  }
  const int r = in.rank;
  const std::int64_t row = in.head_dim * in.elem_bytes;
  std::vector<std::int64_t> qs(L.ranks, 0), qr(L.ranks, 0), os(L.ranks, 0), orr(L.ranks, 0);
  L.qkv_send_block.resize(L.ranks);
  L.qkv_recv_block.resize(L.ranks);
  L.out_send_block.resize(L.ranks);
  L.out_recv_block.resize(L.ranks);
  for (int j = 0; j < L.ranks; ++j) {
    if (j == r) continue;  // the own block is read and written in place
    L.qkv_send_block[j] = qkv_block(in.q_lens[r], in.kv_lens[r], L.q_heads[j].size(),
                                    L.kv_heads[j].size(), row);
    L.qkv_recv_block[j] = qkv_block(in.q_lens[j], in.kv_lens[j], L.q_heads[r].size(),
                                    L.kv_heads[r].size(), row);
    L.out_send_block[j] = out_block(in.q_lens[j], L.q_heads[r].size(), row, in.with_lse);
    L.out_recv_block[j] = out_block(in.q_lens[r], L.q_heads[j].size(), row, in.with_lse);
    qs[j] = L.qkv_send_block[j].bytes;
    qr[j] = L.qkv_recv_block[j].bytes;
    os[j] = L.out_send_block[j].bytes;
    orr[j] = L.out_recv_block[j].bytes;
  }
  place(L.qkv_send, qs);
  place(L.qkv_recv, qr);
  place(L.out_send, os);
  place(L.out_recv, orr);
  for (int j = 0; j < L.ranks; ++j) {
    const ExchangeTotals t = j == r ? ExchangeTotals{L.qkv_send.total, L.qkv_recv.total,
                                                     L.out_send.total, L.out_recv.total}
                                    : exchange_totals(in, j);
    L.qkv_max_total = std::max({L.qkv_max_total, t.qkv_send, t.qkv_recv});
    L.out_max_total = std::max({L.out_max_total, t.out_send, t.out_recv});
  }
  return L;
}

ExchangeTotals exchange_totals(const LayoutInput& in, int r) {
  const int P = static_cast<int>(in.q_lens.size());
  const std::int64_t row = in.head_dim * in.elem_bytes;
  const HeadRange qr = q_heads_of(in.q_heads, P, r);
  const HeadRange kr = kv_heads_of(in.q_heads, in.kv_heads, P, r);
  ExchangeTotals t;
  for (int j = 0; j < P; ++j) {
    if (j == r) continue;
    const HeadRange qj = q_heads_of(in.q_heads, P, j);
    const HeadRange kj = kv_heads_of(in.q_heads, in.kv_heads, P, j);
    t.qkv_send += align_up(qkv_block(in.q_lens[r], in.kv_lens[r], qj.size(), kj.size(), row).bytes, kBlockAlign);
    t.qkv_recv += align_up(qkv_block(in.q_lens[j], in.kv_lens[j], qr.size(), kr.size(), row).bytes, kBlockAlign);
    t.out_send += align_up(out_block(in.q_lens[j], qr.size(), row, in.with_lse).bytes, kBlockAlign);
    t.out_recv += align_up(out_block(in.q_lens[r], qj.size(), row, in.with_lse).bytes, kBlockAlign);
  }
  return t;
}

}  // namespace uaa::detail
