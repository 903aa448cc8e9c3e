// Post-passes of the generators: documents (a step's segments cut at document boundaries, one
// kernel call per document) and batches (parts and steps cut at sequence boundaries). Both only
// re-slice what a generator produced: the bytes that move and the staging layout stay the same.
#include <algorithm>
#include <type_traits>

#include "program/builder.h"
#include "program/program.h"
#include "uaa/error.h"

namespace uaa::detail {
namespace {

// Moves a place `k` tokens on (row_bytes per head; dense_heads: a staging place's heads per row
// when its pitch is 0).
void advance_tokens(Place& p, std::int64_t k, std::int64_t row_bytes, std::int64_t dense_heads) {
  if (is_tensor(p.slot)) p.token += k;
  else if (is_staging(p.slot)) p.offset += k * (p.pitch ? p.pitch : dense_heads) * row_bytes;
}
// Moves a place `dh` heads on.
void advance_heads(Place& p, std::int64_t dh, std::int64_t row_bytes) {
  if (is_tensor(p.slot)) p.head += dh;
  else if (is_staging(p.slot)) p.offset += dh * row_bytes;
}

// Every place of a segment with its row size.
template <typename F>
void for_places(QuerySegment& s, std::int64_t row, F f) {
  f(s.q, row);
  f(s.out, row);
  f(s.lse, std::int64_t{4});
}
template <typename F>
void for_places(BackwardQuerySegment& s, std::int64_t row, F f) {
  f(s.q, row);
  f(s.dout, row);
  f(s.dq, row);
  f(s.lse, std::int64_t{4});
  f(s.delta, std::int64_t{4});
}
template <typename F>
void for_places(KeySegment& s, std::int64_t row, F f) {
  f(s.k, row);
  f(s.v, row);
}

// Cuts `segs` (covering positions [first, ...) in order) at the document starts `start`, and
// returns, per document, the range of the new list inside it.
template <typename Seg>
std::vector<std::uint32_t> cut_at_documents(std::vector<Seg>& segs, std::int64_t first,
                                            const std::vector<std::int64_t>& start, std::int64_t row) {
  const std::size_t docs = start.size() - 1;
  std::vector<Seg> out;
  out.reserve(segs.size() + docs);
  std::vector<std::uint32_t> doc_begin(docs + 1, 0);
  std::size_t d = 0;
  std::int64_t pos = first;
  auto close_docs_before = [&](std::int64_t at) {  // documents ending at or before `at`
    while (d < docs && start[d + 1] <= at) doc_begin[++d] = static_cast<std::uint32_t>(out.size());
  };
  for (Seg s : segs) {
    while (s.tokens > 0) {
      close_docs_before(pos);
      const std::int64_t take = std::min(s.tokens, start[d + 1] - pos);
      Seg piece = s;
      piece.tokens = take;
      out.push_back(piece);
      for_places(s, row, [&](Place& p, std::int64_t rb) { advance_tokens(p, take, rb, s.dense_heads); });
      s.tokens -= take;
      pos += take;
    }
  }
  while (d < docs) doc_begin[++d] = static_cast<std::uint32_t>(out.size());
  segs = std::move(out);
  return doc_begin;
}

template <typename Step>
void split_step(const Geometry& g, Step& c) {
  if (g.q_doc_start.size() <= 2) return;  // one document
  const std::int64_t row = g.head_dim * g.elem_bytes;
  const std::vector<std::uint32_t> qb = cut_at_documents(c.q, c.q_first, g.q_doc_start, row);
  const std::vector<std::uint32_t> kb = cut_at_documents(c.kv, 0, g.kv_doc_start, row);
  c.docs.clear();
  for (std::size_t d = 0; d + 1 < g.q_doc_start.size(); ++d) {
    if (qb[d + 1] == qb[d]) continue;  // no rows of this document in the step
    DocSpan s;
    s.q_begin = qb[d];
    s.q_end = qb[d + 1];
    s.kv_begin = kb[d];
    s.kv_end = kb[d + 1];
    s.q_first = std::max(c.q_first, g.q_doc_start[d]) - g.q_doc_start[d];
    s.q_total = g.q_doc_start[d + 1] - g.q_doc_start[d];
    s.kv_first = g.kv_doc_start[d];
    s.kv_total = g.kv_doc_start[d + 1] - g.kv_doc_start[d];
    c.docs.push_back(s);
  }
}

// Heads per sequence of a slot's tensor.
std::int64_t seq_heads(const Geometry& g, Slot s) {
  const bool kv = s == Slot::k || s == Slot::v || s == Slot::dk || s == Slot::dv;
  return (kv ? g.kv_heads : g.q_heads) / g.batch;
}

// The sub-ranges of heads [h0, h0 + n) inside one sequence each (H heads per sequence).
template <typename F>
void for_sequences(std::int64_t h0, std::int64_t n, std::int64_t H, F f) {
  for (std::int64_t h = h0; h < h0 + n;) {
    const std::int64_t end = std::min(h0 + n, (h / H + 1) * H);
    f(h - h0, end - h);
    h = end;
  }
}

void split_parts(const Geometry& g, std::vector<Part>& parts, std::vector<PeerParts>& peers) {
  std::vector<Part> out;
  out.reserve(parts.size());
  for (PeerParts& pp : peers) {
    const auto begin = static_cast<std::uint32_t>(out.size());
    for (std::uint32_t i = pp.begin; i < pp.end; ++i) {
      const Part& x = parts[i];
      const Place& t = is_tensor(x.src.slot) ? x.src : x.dst;
      if (!is_tensor(t.slot)) {
        out.push_back(x);
        continue;
      }
      for_sequences(t.head, x.heads, seq_heads(g, t.slot), [&](std::int64_t dh, std::int64_t n) {
        Part y = x;
        y.heads = static_cast<std::int32_t>(n);
        for (Place* p : {&y.src, &y.dst}) {
          if (is_staging(p->slot) && p->pitch == 0) p->pitch = x.heads;
          advance_heads(*p, dh, x.row_bytes);
        }
        out.push_back(y);
      });
    }
    pp.begin = begin;
    pp.end = static_cast<std::uint32_t>(out.size());
  }
  parts = std::move(out);
}

void split_exchange(const Geometry& g, ExchangeStep& s) {
  split_parts(g, s.send_parts, s.send);
  split_parts(g, s.recv_parts, s.recv);
}

template <typename Step>
std::vector<Step> split_steps(const Geometry& g, std::vector<Step>& steps) {
  const std::int64_t H = g.q_heads / g.batch, group = g.q_heads / g.kv_heads;
  const std::int64_t row = g.head_dim * g.elem_bytes;
  std::vector<Step> out;
  out.reserve(steps.size());
  // Every step is rebased so that its key/value heads start at its first query head's: a step
  // inside one sequence may still list key/value heads of two (its rank's range), and a caller
  // tensor's head index only steps through one sequence.
  for (Step& c : steps) {
    for_sequences(c.q_head_begin, c.q_heads, H, [&](std::int64_t dh, std::int64_t n) {
      Step sub = c;
      sub.q_head_begin = c.q_head_begin + dh;
      sub.q_heads = n;
      sub.kv_head_begin = sub.q_head_begin / group;
      const std::int64_t dkv = sub.kv_head_begin - c.kv_head_begin;
      for (auto& q : sub.q) for_places(q, row, [&](Place& p, std::int64_t rb) { advance_heads(p, dh, rb); });
      for (auto& k : sub.kv) for_places(k, row, [&](Place& p, std::int64_t rb) { advance_heads(p, dkv, rb); });
      if constexpr (std::is_same_v<Step, BackwardStep>) {
        if (c.dk_carry.slot != Slot::pad && n != c.q_heads)
          throw Error(ErrorCode::internal, "uaa: a step that continues a head spans sequences");
        const std::int64_t block = c.kv_total * g.head_dim * 4;  // one q head's partial sums
        advance_heads(sub.dk_partial, dh, block);
        advance_heads(sub.dv_partial, dh, block);
      }
      out.push_back(std::move(sub));
    });
  }
  return out;
}

}  // namespace

void split_documents(const Geometry& g, ComputeStep& c) { split_step(g, c); }
void split_documents(const Geometry& g, BackwardStep& c) { split_step(g, c); }

void split_batches(const Geometry& g, Program& p) {
  if (g.batch <= 1) return;
  split_exchange(g, p.in);
  split_exchange(g, p.out);
  p.compute = split_steps(g, p.compute);
  finalize(p);
}

void split_batches(const Geometry& g, BackwardProgram& p) {
  if (g.batch <= 1) return;
  for (ExchangeStep* s : {&p.in_saved, &p.in_recompute, &p.carry1, &p.carry2, &p.out}) split_exchange(g, *s);
  p.phase1 = split_steps(g, p.phase1);
  p.phase2 = split_steps(g, p.phase2);
  finalize(p);
}

}  // namespace uaa::detail
