// Program generators: the one place where a plan's geometry becomes bytes.
//
// uaa forward, rank x's staging:
//   stage_in  = [Q piece 0 | Q piece 1 | Q piece 2 | K | V]
//   stage_out = [O piece 0 | O piece 1 | O piece 2 | lse piece 0 | lse piece 1 | lse piece 2]
// Q/O piece i holds the rows of x's piece i that other ranks hold, in global row order, dense
// [rows][piece heads][row]; K/V hold the key/value tokens of the other ranks in global order,
// [tokens][x's kv heads][row]. Every area starts on a 64-byte boundary. Because the other ranks'
// rows are in global order with only x's own rows left out, the offset of rank s's rows inside any
// area is a closed formula (rows of the area before s's, minus x's own if x comes first): O(1) per
// (rank, peer), so one rank's program costs O(P) to build and no rank needs any other rank's
// buffer sizes.
#include "program/program.h"

#include <algorithm>
#include <sstream>

#include "plan/layout.h"
#include "program/builder.h"

namespace uaa::detail {
using namespace build;

const char* slot_name(Slot s) {
  switch (s) {
    case Slot::q: return "q";
    case Slot::k: return "k";
    case Slot::v: return "v";
    case Slot::out: return "out";
    case Slot::lse: return "lse";
    case Slot::stage_in: return "stage_in";
    case Slot::stage_out: return "stage_out";
    case Slot::pad: return "pad";
    case Slot::dout: return "dout";
    case Slot::dq: return "dq";
    case Slot::dk: return "dk";
    case Slot::dv: return "dv";
    case Slot::delta: return "delta";
    case Slot::saved: return "saved";
  }
  return "?";
}

std::int64_t ExchangeStep::bytes_to_peers() const {
  std::int64_t n = 0;
  for (const PeerParts& pp : send)
    if (pp.peer != self)
      for (std::uint32_t i = pp.begin; i < pp.end; ++i) n += send_parts[i].bytes();
  return n;
}
std::int64_t ExchangeStep::bytes_from_peers() const {
  std::int64_t n = 0;
  for (const PeerParts& pp : recv)
    if (pp.peer != self)
      for (std::uint32_t i = pp.begin; i < pp.end; ++i) n += recv_parts[i].bytes();
  return n;
}

Program compile_uaa_forward(const Geometry& g, const std::vector<RankWork>& work, int r) {
  const UaaGeometry G(g, work);
  const int P = static_cast<int>(g.q_lens.size());
  const std::int64_t row = G.row;
  Program prog;
  prog.in.self = prog.out.self = r;
  const RankWork& mine = work[r];
  const RowRange my_tokens = G.tokens(r);
  // Upper bounds: a peer gets at most one part per piece plus K and V (one allocation per list).
  const std::size_t per_peer = kMaxPieces + 2, peers = static_cast<std::size_t>(P);
  prog.in.send_parts.reserve(per_peer * peers);
  prog.in.recv_parts.reserve(per_peer * peers);
  prog.in.send.reserve(peers);
  prog.in.recv.reserve(peers);
  prog.out.send.reserve(peers);
  prog.out.recv.reserve(peers);
  prog.compute.reserve(kMaxPieces);

  // q/k/v in: rank `from` sends rank `to` (to != from), of each of to's pieces the rows `from`
  // holds, then its k/v of the kv heads `to` reads. The send list (from = r) and the receive list
  // (to = r) come from this one function, so they match part for part by construction.
  auto in_parts = [&](StepBuilder& b, int from, int to) {
    const RankWork& w = work[to];
    if (w.pieces == 0) return;
    const RowRange held = G.tokens(from);
    const UaaGeometry::InAreas at = G.in_areas(to);
    b.begin_peer(from == r ? to : from);
    for (int i = 0; i < w.pieces; ++i) {
      const WorkPiece& p = w.piece[i];
      const RowRange rows = rows_held(p, held);
      const std::int64_t nh = p.heads.size();
      b.add(rows.size(), nh, row, tensor(Slot::q, rows.begin - held.begin, p.heads.begin),
            staged(Slot::stage_in, at.q[i] + G.rows_before(to, i, from) * nh * row));
    }
    const std::int64_t nkv = w.kv_heads.size(), kv_off = G.kv_before(to, from) * nkv * row;
    b.add(g.kv_lens[from], nkv, row, tensor(Slot::k, 0, w.kv_heads.begin),
          staged(Slot::stage_in, at.k + kv_off));
    b.add(g.kv_lens[from], nkv, row, tensor(Slot::v, 0, w.kv_heads.begin),
          staged(Slot::stage_in, at.v + kv_off));
    b.end_peer();
  };
  StepBuilder in_send(prog.in.send_parts, prog.in.send), in_recv(prog.in.recv_parts, prog.in.recv);
  for (int j = 0; j < P; ++j)
    if (j != r) in_parts(in_send, r, j);
  for (int j = 0; j < P; ++j)
    if (j != r) in_parts(in_recv, j, r);
  const UaaGeometry::InAreas in_mine = G.in_areas(r);
  const UaaGeometry::OutAreas out_mine = G.out_areas(r);

  // Compute: one step per piece over every rank's rows, in global order; my own rows are read from
  // and written to the caller's tensors.
  for (int i = 0; i < mine.pieces; ++i) {
    const WorkPiece& p = mine.piece[i];
    const std::int64_t nh = p.heads.size();
    ComputeStep c;
    c.q_head_begin = p.heads.begin;
    c.q_heads = nh;
    c.kv_head_begin = mine.kv_heads.begin;
    c.q_first = p.rows.begin;
    c.q_total = G.q_total();
    c.kv_total = G.kv_total();
    c.causal = g.causal;
    c.kv.reserve(peers);
    for (int s = 0; s < P; ++s) {
      const RowRange rows = rows_held(p, G.tokens(s));
      if (rows.size() == 0) continue;
      QuerySegment q;
      q.tokens = rows.size();
      q.dense_heads = nh;
      if (s == r) {
        const std::int64_t t = rows.begin - my_tokens.begin;
        q.q = tensor(Slot::q, t, p.heads.begin);
        q.out = tensor(Slot::out, t, p.heads.begin);
        if (g.with_lse) q.lse = tensor(Slot::lse, t, p.heads.begin);
      } else {
        const std::int64_t before = G.rows_before(r, i, s);
        q.q = staged(Slot::stage_in, in_mine.q[i] + before * nh * row);
        q.out = staged(Slot::stage_out, out_mine.o[i] + before * nh * row);
        if (g.with_lse) q.lse = staged(Slot::stage_out, out_mine.lse[i] + before * nh * G.lse_row);
      }
      c.q.push_back(q);
    }
    c.kv = G.key_segments(r, Slot::stage_in);
    c.window_left = g.window_left;
    c.window_right = g.window_right;
    split_documents(g, c);
    prog.compute.push_back(std::move(c));
  }

  // out: rank `from` returns to rank `to`, of each of from's pieces the rows `to` holds (then
  // their lse); one function for both lists, as for `in`.
  auto out_parts = [&](StepBuilder& b, int from, int to) {
    const RankWork& w = work[from];
    if (w.pieces == 0) return;
    const RowRange owner = G.tokens(to);
    const UaaGeometry::OutAreas at = G.out_areas(from);
    b.begin_peer(from == r ? to : from);
    for (int i = 0; i < w.pieces; ++i) {
      const WorkPiece& p = w.piece[i];
      const RowRange rows = rows_held(p, owner);
      const std::int64_t nh = p.heads.size(), before = G.rows_before(from, i, to);
      const std::int64_t t = rows.begin - owner.begin;
      b.add(rows.size(), nh, row, staged(Slot::stage_out, at.o[i] + before * nh * row),
            tensor(Slot::out, t, p.heads.begin));
      if (g.with_lse)
        b.add(rows.size(), nh, G.lse_row,
              staged(Slot::stage_out, at.lse[i] + before * nh * G.lse_row),
              tensor(Slot::lse, t, p.heads.begin));
    }
    b.end_peer();
  };
  StepBuilder out_send(prog.out.send_parts, prog.out.send), out_recv(prog.out.recv_parts, prog.out.recv);
  for (int j = 0; j < P; ++j)
    if (j != r) out_parts(out_send, r, j);
  for (int j = 0; j < P; ++j)
    if (j != r) out_parts(out_recv, j, r);
  prog.stage_in_bytes = in_mine.total;
  prog.stage_out_bytes = out_mine.total;
  finalize(prog);
  split_batches(g, prog);
  return prog;
}

WorkInput work_input(const Geometry& g) {
  WorkInput w = work_input(g.q_lens, g.kv_lens, g.q_heads, g.kv_heads, g.causal);
  w.window_left = g.window_left;
  w.window_right = g.window_right;
  w.q_doc_start = g.q_doc_start;
  w.kv_doc_start = g.kv_doc_start;
  return w;
}

namespace {

// ulysses / ulysses_pad: every block has the same shape. Rank x's stage_in holds one block per
// source rank s, [Q: q_rows x hq | K: kv_rows x hkv | V: same], and its stage_out one block per
// destination, [O: q_rows x hq | lse: q_rows x hq floats].
struct PaddedGeometry {
  int P = 0;
  std::int64_t q_rows = 0, kv_rows = 0, hq = 0, hkv = 0, group = 1, row = 0;
  std::int64_t q_bytes = 0, kv_bytes = 0, in_block = 0, o_bytes = 0, lse_bytes = 0, out_block = 0;
  std::vector<std::int64_t> kv_head_begin;

  explicit PaddedGeometry(const Geometry& g) {
    P = static_cast<int>(g.q_lens.size());
    auto padded_rows = [&](const std::vector<std::int64_t>& lens) {
      std::int64_t total = 0, longest = 0;
      for (std::int64_t x : lens) {
        total += x;
        longest = std::max(longest, x);
      }
      return std::max((total + P - 1) / P, longest);
    };
    q_rows = padded_rows(g.q_lens);
    kv_rows = padded_rows(g.kv_lens);
    hq = (g.q_heads + P - 1) / P;
    group = g.q_heads / g.kv_heads;
    kv_head_begin.resize(P);
    for (int r = 0; r < P; ++r) {
      const std::int64_t first = r * hq, last = first + hq - 1;
      kv_head_begin[r] = first / group;
      hkv = std::max(hkv, last / group - first / group + 1);
    }
    row = g.head_dim * g.elem_bytes;
    q_bytes = align(q_rows * hq * row);
    kv_bytes = align(kv_rows * hkv * row);
    in_block = q_bytes + 2 * kv_bytes;
    o_bytes = align(q_rows * hq * row);
    lse_bytes = g.with_lse ? align(q_rows * hq * static_cast<std::int64_t>(sizeof(float))) : 0;
    out_block = o_bytes + lse_bytes;
  }
};

// One [rows][heads] block of a tensor sent into a padded [rows_padded][heads_padded] block at
// `dst` (pitch heads_padded): real heads from the tensor, missing heads and rows as padding.
void add_padded_block(StepBuilder& b, Slot tensor_slot, std::int64_t tokens, std::int64_t rows_padded,
                      std::int64_t head0, std::int64_t real_heads_total, std::int64_t heads_padded,
                      std::int64_t row, Place dst) {
  const std::int64_t real = std::clamp<std::int64_t>(real_heads_total - head0, 0, heads_padded);
  Place d = dst;
  d.pitch = static_cast<std::int32_t>(heads_padded);
  b.add(tokens, real, row, tensor(tensor_slot, 0, head0), d);
  Place dh = d;
  dh.offset += real * row;
  b.add(tokens, heads_padded - real, row, pad(), dh);
  Place dr = d;
  dr.offset += tokens * heads_padded * row;
  b.add(rows_padded - tokens, heads_padded, row, pad(), dr);
}

// The mirror for output: a padded block at `src` into [tokens][real heads] of a tensor, the rest
// dropped.
void add_unpadded_block(StepBuilder& b, Slot tensor_slot, std::int64_t tokens,
                        std::int64_t rows_padded, std::int64_t head0, std::int64_t real_heads_total,
                        std::int64_t heads_padded, std::int64_t row, Place src) {
  const std::int64_t real = std::clamp<std::int64_t>(real_heads_total - head0, 0, heads_padded);
  Place s = src;
  s.pitch = static_cast<std::int32_t>(heads_padded);
  b.add(tokens, real, row, s, tensor(tensor_slot, 0, head0));
  Place sh = s;
  sh.offset += real * row;
  b.add(tokens, heads_padded - real, row, sh, pad());
  Place sr = s;
  sr.offset += tokens * heads_padded * row;
  b.add(rows_padded - tokens, heads_padded, row, sr, pad());
}

}  // namespace

Program compile_padded_forward(const Geometry& g, int r) {
  const PaddedGeometry G(g);
  const int P = G.P;
  const std::int64_t row = G.row, lse_row = sizeof(float);
  Program prog;
  prog.in.self = prog.out.self = r;
  // in: my block to every rank (myself included), in the same order on both sides.
  StepBuilder in_send(prog.in.send_parts, prog.in.send), in_recv(prog.in.recv_parts, prog.in.recv);
  auto in_block = [&](StepBuilder& b, int from, int to) {
    const std::int64_t base = from * G.in_block;  // in `to`'s stage_in
    b.begin_peer(from == r ? to : from);
    add_padded_block(b, Slot::q, g.q_lens[from], G.q_rows, to * G.hq, g.q_heads, G.hq, row,
                     staged(Slot::stage_in, base));
    add_padded_block(b, Slot::k, g.kv_lens[from], G.kv_rows, G.kv_head_begin[to], g.kv_heads, G.hkv,
                     row, staged(Slot::stage_in, base + G.q_bytes));
    add_padded_block(b, Slot::v, g.kv_lens[from], G.kv_rows, G.kv_head_begin[to], g.kv_heads, G.hkv,
                     row, staged(Slot::stage_in, base + G.q_bytes + G.kv_bytes));
    b.end_peer();
  };
  for (int j = 0; j < P; ++j) in_block(in_send, r, j);
  for (int j = 0; j < P; ++j) in_block(in_recv, j, r);

  // Compute my padded heads over every block's real rows; then the padded query rows (computed
  // over all real keys, unmasked: their output is dropped).
  ComputeStep c;
  c.q_head_begin = r * G.hq;
  c.q_heads = G.hq;
  c.kv_head_begin = G.kv_head_begin[r];
  c.causal = g.causal;
  ComputeStep pads = c;  // unmasked: their output is dropped
  pads.causal = false;
  c.window_left = g.window_left;
  c.window_right = g.window_right;
  for (int s = 0; s < P; ++s) {
    const std::int64_t in = s * G.in_block, out = s * G.out_block;
    QuerySegment q;
    q.tokens = g.q_lens[s];
    q.dense_heads = G.hq;
    q.q = staged(Slot::stage_in, in);
    q.out = staged(Slot::stage_out, out);
    if (g.with_lse) q.lse = staged(Slot::stage_out, out + G.o_bytes);
    if (q.tokens > 0) c.q.push_back(q);
    c.q_total += q.tokens;
    QuerySegment qp = q;
    qp.tokens = G.q_rows - g.q_lens[s];
    qp.q.offset += g.q_lens[s] * G.hq * row;
    qp.out.offset += g.q_lens[s] * G.hq * row;
    if (g.with_lse) qp.lse.offset += g.q_lens[s] * G.hq * lse_row;
    if (qp.tokens > 0) pads.q.push_back(qp);
    pads.q_total += qp.tokens;
    KeySegment k;
    k.tokens = g.kv_lens[s];
    k.dense_heads = G.hkv;
    k.k = staged(Slot::stage_in, in + G.q_bytes);
    k.v = staged(Slot::stage_in, in + G.q_bytes + G.kv_bytes);
    if (k.tokens > 0) c.kv.push_back(k);
    c.kv_total += k.tokens;
  }
  pads.kv = c.kv;
  pads.kv_total = c.kv_total;
  if (c.q_total > 0) prog.compute.push_back(c);
  if (pads.q_total > 0) prog.compute.push_back(pads);

  // out: my block for every rank (myself included); real rows of real heads land in out/lse.
  StepBuilder out_send(prog.out.send_parts, prog.out.send), out_recv(prog.out.recv_parts, prog.out.recv);
  auto out_block = [&](StepBuilder& b, int from, int to) {
    const std::int64_t base = to * G.out_block;  // in `from`'s stage_out
    b.begin_peer(from == r ? to : from);
    add_unpadded_block(b, Slot::out, g.q_lens[to], G.q_rows, from * G.hq, g.q_heads, G.hq, row,
                       staged(Slot::stage_out, base));
    if (g.with_lse)
      add_unpadded_block(b, Slot::lse, g.q_lens[to], G.q_rows, from * G.hq, g.q_heads, G.hq,
                         lse_row, staged(Slot::stage_out, base + G.o_bytes));
    b.end_peer();
  };
  for (int j = 0; j < P; ++j) out_block(out_send, r, j);
  for (int j = 0; j < P; ++j) out_block(out_recv, j, r);
  prog.stage_in_bytes = P * G.in_block;
  prog.stage_out_bytes = P * G.out_block;
  finalize(prog);
  return prog;
}

Program compile_allgather_kv_forward(const Geometry& g, int r) {
  const int P = static_cast<int>(g.q_lens.size());
  const std::vector<std::int64_t> q_start = prefix_sums(g.q_lens), kv_start = prefix_sums(g.kv_lens);
  const std::int64_t row = g.head_dim * g.elem_bytes, kv_total = kv_start.back();
  // Rank x's stage_in: [K of the other ranks in global order | V likewise], all kv heads.
  auto k_bytes = [&](int x) { return align((kv_total - g.kv_lens[x]) * g.kv_heads * row); };
  auto before = [&](int x, int s) { return (kv_start[s] - (x < s ? g.kv_lens[x] : 0)) * g.kv_heads * row; };
  Program prog;
  prog.in.self = prog.out.self = r;
  StepBuilder send(prog.in.send_parts, prog.in.send), recv(prog.in.recv_parts, prog.in.recv);
  for (int j = 0; j < P; ++j) {
    if (j == r) continue;
    send.begin_peer(j);
    send.add(g.kv_lens[r], g.kv_heads, row, tensor(Slot::k, 0, 0), staged(Slot::stage_in, before(j, r)));
    send.add(g.kv_lens[r], g.kv_heads, row, tensor(Slot::v, 0, 0),
             staged(Slot::stage_in, k_bytes(j) + before(j, r)));
    send.end_peer();
    recv.begin_peer(j);
    recv.add(g.kv_lens[j], g.kv_heads, row, tensor(Slot::k, 0, 0), staged(Slot::stage_in, before(r, j)));
    recv.add(g.kv_lens[j], g.kv_heads, row, tensor(Slot::v, 0, 0),
             staged(Slot::stage_in, k_bytes(r) + before(r, j)));
    recv.end_peer();
  }
  // My query rows, all heads, over the keys up to the causal horizon of my last row: with
  // q_total = n and kv_total = that horizon, the kernel's rule j <= i_local + kv_total - q_total is
  // exactly j <= i + (Skv - Sq) for global row i = first + i_local, and keys keep their global
  // positions (they start at 0), so the result is bitwise that of uaa.
  const std::int64_t n = g.q_lens[r], first = q_start[r], q_total = q_start.back();
  // With a window the keys to the right of the horizon may be visible: the rows keep their global
  // positions instead (q_first = first of q_total, every key).
  const bool windowed = g.window_left >= 0 || g.window_right >= 0;
  const std::int64_t keys =
      g.causal && !windowed ? std::clamp<std::int64_t>(first + n + kv_total - q_total, 0, kv_total)
                            : kv_total;
  if (n > 0) {
    ComputeStep c;
    c.q_heads = g.q_heads;
    c.q_first = windowed ? first : 0;
    c.q_total = windowed ? q_total : n;
    c.kv_total = keys;
    c.causal = g.causal;
    c.window_left = g.window_left;
    c.window_right = g.window_right;
    QuerySegment q;
    q.tokens = n;
    q.q = tensor(Slot::q, 0, 0);
    q.out = tensor(Slot::out, 0, 0);
    if (g.with_lse) q.lse = tensor(Slot::lse, 0, 0);
    c.q.push_back(q);
    std::int64_t at = 0;
    for (int s = 0; s < P && at < keys; ++s) {
      const std::int64_t take = std::min(g.kv_lens[s], keys - at);
      at += take;
      if (take == 0) continue;
      KeySegment k;
      k.tokens = take;
      k.dense_heads = g.kv_heads;
      if (s == r) {
        k.k = tensor(Slot::k, 0, 0);
        k.v = tensor(Slot::v, 0, 0);
      } else {
        k.k = staged(Slot::stage_in, before(r, s));
        k.v = staged(Slot::stage_in, k_bytes(r) + before(r, s));
      }
      c.kv.push_back(k);
    }
    prog.compute.push_back(std::move(c));
  }
  prog.stage_in_bytes = 2 * k_bytes(r);
  finalize(prog);
  return prog;
}

std::int64_t packed_need(const ExchangeStep& s, bool send) {
  std::int64_t n = 0;
  const auto& peers = send ? s.send : s.recv;
  const auto& parts = send ? s.send_parts : s.recv_parts;
  for (const PeerParts& pp : peers)
    if (pp.peer != s.self)
      for (std::uint32_t i = pp.begin; i < pp.end; ++i) {
        const Part& x = parts[i];
        if (!is_dense_staging(send ? x.src : x.dst, x.heads)) n += packed_bytes(x);
      }
  return n;
}

void finalize(Program& p) {
  p.pack_bytes = std::max(packed_need(p.in, true), packed_need(p.out, true));
  p.unpack_bytes = std::max(packed_need(p.in, false), packed_need(p.out, false));
}

std::string describe(const Program& p) {
  std::ostringstream o;
  auto place = [&](const Place& x) {
    o << slot_name(x.slot);
    if (is_tensor(x.slot)) o << "[t" << x.token << ",h" << x.head << "]";
    if (is_staging(x.slot)) {
      o << "@" << x.offset;
      if (x.pitch) o << "/p" << x.pitch;
    }
  };
  auto step = [&](const char* name, const ExchangeStep& s) {
    for (int side = 0; side < 2; ++side) {
      const auto& peers = side == 0 ? s.send : s.recv;
      const auto& parts = side == 0 ? s.send_parts : s.recv_parts;
      for (const PeerParts& pp : peers) {
        o << name << (side == 0 ? " send to " : " recv from ") << pp.peer << ":";
        for (std::uint32_t i = pp.begin; i < pp.end; ++i) {
          const Part& x = parts[i];
          o << " " << x.tokens << "x" << x.heads << "x" << x.row_bytes << " ";
          place(x.src);
          o << "->";
          place(x.dst);
        }
        o << "\n";
      }
    }
  };
  step("in", p.in);
  for (const ComputeStep& c : p.compute) {
    o << "compute heads [" << c.q_head_begin << ",+" << c.q_heads << ") kv from " << c.kv_head_begin
      << " rows from " << c.q_first << " of " << c.q_total << ", keys " << c.kv_total
      << (c.causal ? " causal" : "");
    if (c.window_left >= 0 || c.window_right >= 0)
      o << " window (" << c.window_left << "," << c.window_right << ")";
    if (!c.docs.empty()) o << ", " << c.docs.size() << " documents";
    o << ": q";
    for (const QuerySegment& q : c.q) {
      o << " " << q.tokens << ":";
      place(q.q);
      o << "=>";
      place(q.out);
    }
    o << "; kv";
    for (const KeySegment& k : c.kv) {
      o << " " << k.tokens << ":";
      place(k.k);
    }
    o << "\n";
  }
  step("out", p.out);
  o << "stage_in " << p.stage_in_bytes << " B, stage_out " << p.stage_out_bytes << " B\n";
  return o.str();
}

}  // namespace uaa::detail
