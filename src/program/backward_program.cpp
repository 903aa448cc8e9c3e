// The uaa backward program generator (program.h describes the steps).
//
// Rank x's staging:
//   stage_in  = [dO piece 0..2 | lse piece 0..2 | delta piece 0..2 | carry dK | carry dV |
//                reduce dK | reduce dV]
//   stage_out = [dQ piece 0..2 | partial dK | partial dV]
//   saved     = the forward's stage_in ([Q piece 0..2 | K | V], program.cpp)
// Pieces hold the rows of x's work that other ranks own, in global order (as in the forward), so
// every offset is a closed formula. The partial areas hold, per q head x works on, fp32
// [kv_total][head_dim] sums over x's rows of that head; carry areas the sums of the rows before
// x's first row (a head x continues); reduce areas, per q head h of the whole shape, the slice of
// h's sums over x's own key tokens, sent by the rank that completes h (unused when x completes h
// itself: the reduce reads its own partial area then).
#include <algorithm>
#include <cmath>

#include "kernels/kernel.h"
#include "program/builder.h"
#include "program/program.h"

namespace uaa::detail {
namespace {

using namespace build;

struct BackwardGeometry {
  const Geometry& g;
  const std::vector<RankWork>& work;
  const UaaGeometry G;
  const int P;
  const std::int64_t row, f32_row;  // a dtype row and an fp32 row of head_dim
  std::vector<int> prev_busy, next_busy;  // nearest rank with work before / after (-1 / P: none)
  const bool canonical;                   // BackwardOrder::canonical (else by_rank: no carries)
  // The ranks whose sums of q head h reach the key owners: canonical, the one holding its last row;
  // by_rank, every busy rank holding rows of it (consecutive busy ranks). -1: none (no rows).
  std::vector<int> first_contrib, last_contrib;
  std::vector<std::int64_t> slot_base;    // per q head: its first reduce slot (prefix sums)
  std::vector<int> busy_before;           // busy ranks before rank x

  BackwardGeometry(const Geometry& geo, const std::vector<RankWork>& w, bool canonical_order)
      : g(geo), work(w), G(geo, w), P(static_cast<int>(geo.q_lens.size())),
        row(geo.head_dim * geo.elem_bytes), f32_row(geo.head_dim * 4), canonical(canonical_order) {
    prev_busy.assign(P, -1);
    next_busy.assign(P, P);
    for (int x = 1, last = -1; x < P; ++x) {
      if (work[x - 1].pieces > 0) last = x - 1;
      prev_busy[x] = last;
    }
    for (int x = P - 2, next = P; x >= 0; --x) {
      if (work[x + 1].pieces > 0) next = x + 1;
      next_busy[x] = next;
    }
    first_contrib.assign(static_cast<std::size_t>(g.q_heads), -1);
    last_contrib.assign(static_cast<std::size_t>(g.q_heads), -1);
    busy_before.assign(static_cast<std::size_t>(P) + 1, 0);
    for (int x = 0; x < P; ++x) {
      busy_before[x + 1] = busy_before[x] + (work[x].pieces > 0 ? 1 : 0);
      const HeadRange done = completed_heads(x);
      for (std::int64_t h = done.begin; h < done.end; ++h) {
        if (first_contrib[h] < 0) first_contrib[h] = x;
        last_contrib[h] = x;
      }
    }
    slot_base.assign(static_cast<std::size_t>(g.q_heads) + 1, 0);
    for (std::int64_t h = 0; h < g.q_heads; ++h)
      slot_base[h + 1] = slot_base[h] + (first_contrib[h] < 0 ? 0 : contributors(h));
  }
  std::int64_t contributors(std::int64_t h) const {
    return busy_before[last_contrib[h] + 1] - busy_before[first_contrib[h]];
  }
  // The reduce slot, on any key owner, of the sums of q head h that rank y contributes.
  std::int64_t slot_of(std::int64_t h, int y) const {
    return slot_base[h] + busy_before[y] - busy_before[first_contrib[h]];
  }

  // x continues a head whose earlier rows another rank holds (its piece 0 starts past row 0).
  bool carry_in(int x) const {
    return canonical && work[x].pieces > 0 && work[x].piece[0].rows.begin > 0;
  }
  // x's last head ends before the last row (the next busy rank continues it).
  bool carry_out(int x) const {
    const RankWork& w = work[x];
    return canonical && w.pieces > 0 && w.piece[w.pieces - 1].rows.end < G.q_total();
  }
  HeadRange completed_heads(int x) const {
    HeadRange h = work[x].q_heads;
    if (carry_out(x)) --h.end;
    return h;
  }
  std::int64_t local_head(int x, std::int64_t h) const { return h - work[x].q_heads.begin; }
  // Canonical order: a rank that completes the first q head of a GQA group adds the group's later
  // heads it also completes into that head's sums (the chain prefix of the owner's sum, hence the
  // same bits) and sends one block for them. True for those later heads.
  bool folded(int x, std::int64_t h) const {
    if (!canonical) return false;
    const std::int64_t group = g.q_heads / g.kv_heads, first = h - h % group;
    const HeadRange done = completed_heads(x);
    return h != first && done.begin <= first && h < done.end;
  }

  struct InAreas {
    std::int64_t dout[kMaxPieces] = {}, lse[kMaxPieces] = {}, delta[kMaxPieces] = {};
    std::int64_t carry_dk = 0, carry_dv = 0, reduce_dk = 0, reduce_dv = 0, total = 0;
  };
  InAreas in_areas(int x) const {
    InAreas a;
    std::int64_t at = 0;
    const RankWork& w = work[x];
    for (int i = 0; i < w.pieces; ++i) {
      a.dout[i] = at;
      at += align(G.foreign_rows(x, i) * w.piece[i].heads.size() * row);
    }
    for (int i = 0; i < w.pieces; ++i) {
      a.lse[i] = at;
      at += align(G.foreign_rows(x, i) * w.piece[i].heads.size() * 4);
    }
    for (int i = 0; i < w.pieces; ++i) {
      a.delta[i] = at;
      at += align(G.foreign_rows(x, i) * w.piece[i].heads.size() * 4);
    }
    const std::int64_t carry = carry_in(x) ? align(G.kv_total() * f32_row) : 0;
    a.carry_dk = at;
    at += carry;
    a.carry_dv = at;
    at += carry;
    const std::int64_t reduce = align(slot_base[g.q_heads] * g.kv_lens[x] * f32_row);
    a.reduce_dk = at;
    at += reduce;
    a.reduce_dv = at;
    at += reduce;
    a.total = at;
    return a;
  }
  struct OutAreas {
    std::int64_t dq[kMaxPieces] = {}, partial_dk = 0, partial_dv = 0, total = 0;
  };
  OutAreas out_areas(int x) const {
    OutAreas a;
    std::int64_t at = 0;
    const RankWork& w = work[x];
    for (int i = 0; i < w.pieces; ++i) {
      a.dq[i] = at;
      at += align(G.foreign_rows(x, i) * w.piece[i].heads.size() * row);
    }
    const std::int64_t partial = align(w.q_heads.size() * G.kv_total() * f32_row);
    a.partial_dk = at;
    at += partial;
    a.partial_dv = at;
    at += partial;
    a.total = at;
    return a;
  }
  // Byte offset, inside a partial area of x, of head h's sums at key token `token`.
  std::int64_t partial_offset(int x, std::int64_t h, std::int64_t token) const {
    return (local_head(x, h) * G.kv_total() + token) * f32_row;
  }
};

}  // namespace

std::int64_t BackwardProgram::bytes_sent(bool saved) const {
  return (saved ? in_saved : in_recompute).bytes_to_peers() + carry1.bytes_to_peers() +
         carry2.bytes_to_peers() + out.bytes_to_peers();
}
std::int64_t BackwardProgram::bytes_received(bool saved) const {
  return (saved ? in_saved : in_recompute).bytes_from_peers() + carry1.bytes_from_peers() +
         carry2.bytes_from_peers() + out.bytes_from_peers();
}

void finalize(BackwardProgram& p) {
  const ExchangeStep* steps[] = {&p.in_saved, &p.in_recompute, &p.carry1, &p.carry2, &p.out};
  p.pack_bytes = p.unpack_bytes = 0;
  for (const ExchangeStep* s : steps) {
    p.pack_bytes = std::max(p.pack_bytes, packed_need(*s, true));
    p.unpack_bytes = std::max(p.unpack_bytes, packed_need(*s, false));
  }
}

BackwardProgram compile_uaa_backward(const Geometry& g, const std::vector<RankWork>& work, int r,
                                     bool canonical) {
  const BackwardGeometry B(g, work, canonical);
  const UaaGeometry& G = B.G;
  const int P = B.P;
  const std::int64_t row = B.row, f32_row = B.f32_row, kv_total = G.kv_total();
  BackwardProgram prog;
  for (ExchangeStep* s : {&prog.in_saved, &prog.in_recompute, &prog.carry1, &prog.carry2, &prog.out})
    s->self = r;
  const RankWork& mine = work[r];
  const RowRange my_tokens = G.tokens(r);

  // in: rank `from` sends rank `to` the dO, lse and delta rows of to's pieces that it owns; in
  // recompute mode first the forward's q/k/v parts, into `saved` at the forward's offsets. One
  // function makes both the send and the receive lists (they match part for part).
  auto in_parts = [&](StepBuilder& b, int from, int to, bool recompute) {
    const RankWork& w = work[to];
    if (w.pieces == 0) return;
    const RowRange held = G.tokens(from);
    const UaaGeometry::InAreas fwd = G.in_areas(to);
    const BackwardGeometry::InAreas at = B.in_areas(to);
    b.begin_peer(from == r ? to : from);
    for (int i = 0; i < w.pieces; ++i) {
      const WorkPiece& p = w.piece[i];
      const RowRange rows = rows_held(p, held);
      const std::int64_t nh = p.heads.size(), before = G.rows_before(to, i, from);
      const std::int64_t t = rows.begin - held.begin;
      if (recompute)
        b.add(rows.size(), nh, row, tensor(Slot::q, t, p.heads.begin),
              staged(Slot::saved, fwd.q[i] + before * nh * row));
      b.add(rows.size(), nh, row, tensor(Slot::dout, t, p.heads.begin),
            staged(Slot::stage_in, at.dout[i] + before * nh * row));
      b.add(rows.size(), nh, 4, tensor(Slot::lse, t, p.heads.begin),
            staged(Slot::stage_in, at.lse[i] + before * nh * 4));
      b.add(rows.size(), nh, 4, tensor(Slot::delta, t, p.heads.begin),
            staged(Slot::stage_in, at.delta[i] + before * nh * 4));
    }
    if (recompute) {
      const std::int64_t nkv = w.kv_heads.size(), kv_off = G.kv_before(to, from) * nkv * row;
      b.add(g.kv_lens[from], nkv, row, tensor(Slot::k, 0, w.kv_heads.begin),
            staged(Slot::saved, fwd.k + kv_off));
      b.add(g.kv_lens[from], nkv, row, tensor(Slot::v, 0, w.kv_heads.begin),
            staged(Slot::saved, fwd.v + kv_off));
    }
    b.end_peer();
  };
  for (bool recompute : {false, true}) {
    ExchangeStep& s = recompute ? prog.in_recompute : prog.in_saved;
    StepBuilder send(s.send_parts, s.send), recv(s.recv_parts, s.recv);
    for (int j = 0; j < P; ++j)
      if (j != r) in_parts(send, r, j, recompute);
    for (int j = 0; j < P; ++j)
      if (j != r) in_parts(recv, j, r, recompute);
  }

  // Compute: one step per piece, as the forward's, reading q/k/v of other ranks from `saved`.
  const UaaGeometry::InAreas fwd_mine = G.in_areas(r);
  const BackwardGeometry::InAreas in_mine = B.in_areas(r);
  const BackwardGeometry::OutAreas out_mine = B.out_areas(r);
  // One step: query heads `heads` over rows `rows` of piece i (rows within one head when heads has
  // more than one head: then rows are the piece's). `carry`: where head 0's chain starts.
  enum class Start { zero, received, self };
  const std::vector<KeySegment> keys = G.key_segments(r, Slot::saved);  // the same for every step
  auto make_step = [&](int i, HeadRange heads, RowRange rows, Start start) {
    const WorkPiece& piece = mine.piece[i];
    const std::int64_t nh = heads.size();
    const std::int64_t pitch = piece.heads.size();  // staging rows hold the piece's heads
    const std::int64_t h_off = heads.begin - piece.heads.begin;
    BackwardStep c;
    c.q_head_begin = heads.begin;
    c.q_heads = nh;
    c.kv_head_begin = mine.kv_heads.begin;
    c.q_first = rows.begin;
    c.q_total = G.q_total();
    c.kv_total = kv_total;
    c.causal = g.causal;
    const WorkPiece sub{heads, rows};
    for (int s = 0; s < P; ++s) {
      const RowRange held = rows_held(sub, G.tokens(s));
      if (held.size() == 0) continue;
      BackwardQuerySegment q;
      q.tokens = held.size();
      q.dense_heads = nh;
      if (s == r) {
        const std::int64_t t = held.begin - my_tokens.begin;
        q.q = tensor(Slot::q, t, heads.begin);
        q.dout = tensor(Slot::dout, t, heads.begin);
        q.lse = tensor(Slot::lse, t, heads.begin);
        q.delta = tensor(Slot::delta, t, heads.begin);
        q.dq = tensor(Slot::dq, t, heads.begin);
      } else {
        // Rows of rank s inside the piece's staging area: pitch = the piece's heads.
        const std::int64_t before = G.rows_before(r, i, s) + (held.begin - rows_held(piece, G.tokens(s)).begin);
        q.q = staged(Slot::saved, fwd_mine.q[i] + (before * pitch + h_off) * row, pitch);
        q.dout = staged(Slot::stage_in, in_mine.dout[i] + (before * pitch + h_off) * row, pitch);
        q.lse = staged(Slot::stage_in, in_mine.lse[i] + (before * pitch + h_off) * 4, pitch);
        q.delta = staged(Slot::stage_in, in_mine.delta[i] + (before * pitch + h_off) * 4, pitch);
        q.dq = staged(Slot::stage_out, out_mine.dq[i] + (before * pitch + h_off) * row, pitch);
      }
      c.q.push_back(q);
    }
    c.kv = keys;
    c.window_left = g.window_left;
    c.window_right = g.window_right;
    split_documents(g, c);
    const std::int64_t head0 = B.partial_offset(r, heads.begin, 0);
    c.dk_partial = staged(Slot::stage_out, out_mine.partial_dk + head0);
    c.dv_partial = staged(Slot::stage_out, out_mine.partial_dv + head0);
    c.dk_carry = start == Start::received ? staged(Slot::stage_in, in_mine.carry_dk)
                 : start == Start::self   ? c.dk_partial
                                          : pad();
    c.dv_carry = start == Start::received ? staged(Slot::stage_in, in_mine.carry_dv)
                 : start == Start::self   ? c.dv_partial
                                          : pad();
    return c;
  };

  // Schedule. The carries of all ranks are exchanged at one meeting point (carry1), placed at the
  // same modelled time T on every rank: T = the largest work any rank must do before it can send
  // (its piece that ends early, run first). Before T a rank runs that piece, then whole heads up to
  // T (the head at T split at a 48-row multiple and continued in place afterwards); after T the
  // rest, and last the piece that continues a head from the received carry. With balanced work no
  // rank waits for a carry; before this schedule (carry sent after all other work) the rank
  // continuing a shared head waited for its predecessor's whole phase.
  const RowWork row_work(work_input(g));
  auto piece_work = [&](const WorkPiece& p) {
    return static_cast<double>(row_work.pairs(p.rows.begin, p.rows.size())) *
           static_cast<double>(p.heads.size());
  };
  double meet = 0;
  for (int x = 0; x < P; ++x)
    if (B.carry_out(x) && !(work[x].pieces == 1 && B.carry_in(x)))
      meet = std::max(meet, piece_work(work[x].piece[work[x].pieces - 1]));
  const bool chain = mine.pieces == 1 && B.carry_in(r) && B.carry_out(r);
  const bool meets = B.carry_in(r) || B.carry_out(r);
  double before_meet = 0;
  for (int i = 0; i < mine.pieces; ++i) {  // the piece that ends early first (it is the last piece)
    const WorkPiece& p = mine.piece[i];
    const bool continues = i == 0 && B.carry_in(r);
    const bool ends_early = i == mine.pieces - 1 && B.carry_out(r);
    if (continues || !ends_early) continue;
    prog.phase1.push_back(make_step(i, p.heads, p.rows, Start::zero));
    before_meet += piece_work(p);
  }
  for (int i = 0; i < mine.pieces; ++i) {  // whole heads, split at the meeting point
    const WorkPiece& p = mine.piece[i];
    const bool continues = i == 0 && B.carry_in(r);
    const bool ends_early = i == mine.pieces - 1 && B.carry_out(r);
    if (continues || ends_early) continue;
    const double head_work = piece_work(WorkPiece{{p.heads.begin, p.heads.begin + 1}, p.rows});
    const double budget = meets ? std::max(0.0, meet - before_meet) : piece_work(p);
    std::int64_t whole = head_work > 0 ? static_cast<std::int64_t>(budget / head_work) : p.heads.size();
    whole = std::min(whole, p.heads.size());
    const HeadRange first{p.heads.begin, p.heads.begin + whole};
    if (first.size() > 0) prog.phase1.push_back(make_step(i, first, p.rows, Start::zero));
    if (whole == p.heads.size()) continue;
    // The head at the meeting point: rows [rows.begin, cut) before, [cut, rows.end) after.
    const std::int64_t h = p.heads.begin + whole;
    const double rest = budget - static_cast<double>(whole) * head_work;
    // The first allowed cut (a document start or a granule from one) whose work reaches `rest`.
    const std::int64_t cut = row_work.cut(
        row_work.prefix(p.rows.begin) + static_cast<__int128>(std::max(0.0, std::ceil(rest))),
        p.rows.begin, p.rows.end);
    if (cut > p.rows.begin)
      prog.phase1.push_back(make_step(i, {h, h + 1}, {p.rows.begin, cut}, Start::zero));
    prog.phase2.push_back(make_step(i, {h, h + 1}, {cut, p.rows.end},
                                    cut > p.rows.begin ? Start::self : Start::zero));
    if (h + 1 < p.heads.end) prog.phase2.push_back(make_step(i, {h + 1, p.heads.end}, p.rows, Start::zero));
  }
  if (mine.pieces > 0 && B.carry_in(r)) {  // the continued head, last
    const WorkPiece& p = mine.piece[0];
    prog.phase2.push_back(make_step(0, p.heads, p.rows, Start::received));
  }

  // Carries: `from` passes the sums of its last head's rows to the next busy rank, which
  // continues that head. Sent in carry1 when produced in phase1, else (the piece that ends early
  // is the one that continued a head) in carry2; received in carry1.
  auto carry_parts = [&](StepBuilder& b, int from, int to) {
    const std::int64_t h = work[from].piece[work[from].pieces - 1].heads.begin;
    const BackwardGeometry::OutAreas src = B.out_areas(from);
    const BackwardGeometry::InAreas dst = B.in_areas(to);
    b.begin_peer(from == r ? to : from);
    b.add(kv_total, 1, f32_row, staged(Slot::stage_out, src.partial_dk + B.partial_offset(from, h, 0)),
          staged(Slot::stage_in, dst.carry_dk));
    b.add(kv_total, 1, f32_row, staged(Slot::stage_out, src.partial_dv + B.partial_offset(from, h, 0)),
          staged(Slot::stage_in, dst.carry_dv));
    b.end_peer();
  };
  if (B.carry_out(r)) {
    const bool late = chain;
    ExchangeStep& s = late ? prog.carry2 : prog.carry1;
    StepBuilder send(s.send_parts, s.send);
    carry_parts(send, r, B.next_busy[r]);
  }
  if (B.carry_in(r)) {
    StepBuilder recv(prog.carry1.recv_parts, prog.carry1.recv);
    carry_parts(recv, B.prev_busy[r], r);
  }

  // out: `from` returns to `to` the dQ rows `to` owns, then for every head `from` completes the
  // slice of its dK and dV sums over to's key tokens.
  auto out_parts = [&](StepBuilder& b, int from, int to) {
    const RankWork& w = work[from];
    if (w.pieces == 0) return;
    const RowRange owner = G.tokens(to);
    const BackwardGeometry::OutAreas at = B.out_areas(from);
    b.begin_peer(from == r ? to : from);
    for (int i = 0; i < w.pieces; ++i) {
      const WorkPiece& p = w.piece[i];
      const RowRange rows = rows_held(p, owner);
      const std::int64_t nh = p.heads.size(), before = G.rows_before(from, i, to);
      b.add(rows.size(), nh, row, staged(Slot::stage_out, at.dq[i] + before * nh * row),
            tensor(Slot::dq, rows.begin - owner.begin, p.heads.begin));
    }
    const std::int64_t n = g.kv_lens[to];
    if (n > 0) {
      const BackwardGeometry::InAreas dst = B.in_areas(to);
      const HeadRange done = B.completed_heads(from);
      for (std::int64_t h = done.begin; h < done.end; ++h) {
        if (B.folded(from, h)) continue;
        const std::int64_t src = B.partial_offset(from, h, G.kv_start[to]);
        b.add(n, 1, f32_row, staged(Slot::stage_out, at.partial_dk + src),
              staged(Slot::stage_in, dst.reduce_dk + B.slot_of(h, from) * n * f32_row));
        b.add(n, 1, f32_row, staged(Slot::stage_out, at.partial_dv + src),
              staged(Slot::stage_in, dst.reduce_dv + B.slot_of(h, from) * n * f32_row));
      }
    }
    b.end_peer();
  };
  {
    StepBuilder send(prog.out.send_parts, prog.out.send), recv(prog.out.recv_parts, prog.out.recv);
    for (int j = 0; j < P; ++j)
      if (j != r) out_parts(send, r, j);
    for (int j = 0; j < P; ++j)
      if (j != r) out_parts(recv, j, r);
  }

  // reduce: per kv head, the q heads of its group in ascending order.
  ReduceStep& red = prog.reduce;
  red.kv_tokens = g.kv_lens[r];
  const std::int64_t group = g.q_heads / g.kv_heads, n = g.kv_lens[r];
  red.term_begin.assign(static_cast<std::size_t>(g.kv_heads) + 1, 0);
  for (std::int64_t kvh = 0; kvh < g.kv_heads; ++kvh) {
    red.term_begin[kvh] = static_cast<std::uint32_t>(red.terms.size());
    if (n == 0) continue;
    for (std::int64_t h = kvh * group; h < (kvh + 1) * group; ++h) {
      if (B.first_contrib[h] < 0) continue;  // no query rows at all: the gradients are zero
      for (int y = B.first_contrib[h]; y <= B.last_contrib[h]; ++y) {
        if (work[y].pieces == 0 || B.folded(y, h)) continue;
        ReduceTerm t;
        if (y == r) {
          const std::int64_t off = B.partial_offset(r, h, G.kv_start[r]);
          t.dk = staged(Slot::stage_out, out_mine.partial_dk + off);
          t.dv = staged(Slot::stage_out, out_mine.partial_dv + off);
        } else {
          const std::int64_t off = B.slot_of(h, y) * n * f32_row;
          t.dk = staged(Slot::stage_in, in_mine.reduce_dk + off);
          t.dv = staged(Slot::stage_in, in_mine.reduce_dv + off);
        }
        red.terms.push_back(t);
      }
    }
  }
  red.term_begin[g.kv_heads] = static_cast<std::uint32_t>(red.terms.size());

  // fold (after phase2 and carry2, before out): the group prefixes this rank pre-adds.
  {
    const HeadRange done = B.completed_heads(r);
    const std::int64_t group_size = g.q_heads / g.kv_heads;
    for (std::int64_t h = done.begin; h < done.end; ++h) {
      if (!B.folded(r, h)) continue;
      const std::int64_t first = h - h % group_size;
      FoldTerm f;
      f.dk_into = staged(Slot::stage_out, out_mine.partial_dk + B.partial_offset(r, first, 0));
      f.dv_into = staged(Slot::stage_out, out_mine.partial_dv + B.partial_offset(r, first, 0));
      f.dk_from = staged(Slot::stage_out, out_mine.partial_dk + B.partial_offset(r, h, 0));
      f.dv_from = staged(Slot::stage_out, out_mine.partial_dv + B.partial_offset(r, h, 0));
      prog.fold.push_back(f);
    }
  }

  prog.stage_in_bytes = in_mine.total;
  prog.stage_out_bytes = out_mine.total;
  prog.saved_bytes = fwd_mine.total;
  finalize(prog);
  split_batches(g, prog);
  return prog;
}

std::string describe(const BackwardProgram& p) {
  Program view;  // reuse the forward's dump for the exchanges
  std::string s;
  auto exchange = [&](const char* name, const ExchangeStep& e) {
    view.in = e;
    view.out = ExchangeStep{};
    std::string d = describe(view);
    std::string out;
    std::size_t at = 0;
    while (at < d.size()) {  // rename the "in" prefix of each line
      const std::size_t nl = d.find('\n', at);
      const std::string line = d.substr(at, nl == std::string::npos ? std::string::npos : nl - at + 1);
      out += line.rfind("in ", 0) == 0 ? std::string(name) + line.substr(2) : line;
      if (nl == std::string::npos) break;
      at = nl + 1;
    }
    s += out;
  };
  exchange("in(saved)", p.in_saved);
  exchange("in(recompute)", p.in_recompute);
  auto steps = [&](const char* name, const std::vector<BackwardStep>& v) {
    for (const BackwardStep& c : v)
      s += std::string(name) + " heads [" + std::to_string(c.q_head_begin) + ",+" +
           std::to_string(c.q_heads) + ") rows from " + std::to_string(c.q_first) + ", " +
           std::to_string(c.q.size()) + " q segments, " + std::to_string(c.kv.size()) +
           " kv segments" + (c.docs.empty() ? "" : ", " + std::to_string(c.docs.size()) + " documents") +
           (c.dk_carry.slot == Slot::pad ? "" : ", continues a head") + "\n";
  };
  steps("phase1", p.phase1);
  exchange("carry1", p.carry1);
  steps("phase2", p.phase2);
  exchange("carry2", p.carry2);
  if (!p.fold.empty()) s += "fold " + std::to_string(p.fold.size()) + " heads into their group's first\n";
  exchange("out", p.out);
  s += "reduce " + std::to_string(p.reduce.terms.size()) + " terms over " +
       std::to_string(p.reduce.kv_tokens) + " key tokens\n";
  return s;
}

}  // namespace uaa::detail
