// Properties of the backward programs (src/program/backward_program.cpp) over random geometries,
// every rank's program compiled in one process:
//   [symmetry] for every exchange (in, both modes; out), r's send parts to j are j's receive parts
//              from r in the same order; the carries r sends to j (carry1 then carry2) are the ones
//              j receives from r in carry1;
//   [bounds]   every staging place lies inside its area (stage_in, stage_out, saved) of that rank;
//   [chain]    each head's rows are covered once, in order; a step past row 0 continues a chain:
//              from the received carry (canonical order) or in place; by_rank: no carries;
//   [reduce]   every rank's reduce has, per kv head, one term per q head of its group (by_rank: one
//              per rank holding rows of it), in ascending order (none when there are no query rows);
//   [bytes]    over all ranks, bytes sent equal bytes received, per mode; saved mode moves less.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <string>
#include <tuple>
#include <vector>

#include "common/test_rng.h"
#include "plan/layout.h"
#include "program/program.h"

namespace uaa::test {
namespace {

using detail::BackwardProgram;
using detail::ExchangeStep;
using detail::Geometry;
using detail::Part;
using detail::Place;
using detail::Slot;

bool same_place(const Place& a, const Place& b) {
  return a.slot == b.slot && a.pitch == b.pitch && a.token == b.token && a.head == b.head &&
         a.offset == b.offset;
}
bool same_part(const Part& a, const Part& b) {
  return a.tokens == b.tokens && a.heads == b.heads && a.row_bytes == b.row_bytes &&
         same_place(a.src, b.src) && same_place(a.dst, b.dst);
}

std::vector<Part> parts_to(const ExchangeStep& s, int peer, bool send) {
  std::vector<Part> out;
  for (const auto& pp : send ? s.send : s.recv)
    if (pp.peer == peer)
      for (std::uint32_t i = pp.begin; i < pp.end; ++i)
        out.push_back((send ? s.send_parts : s.recv_parts)[i]);
  return out;
}

bool same_parts(const std::vector<Part>& a, const std::vector<Part>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!same_part(a[i], b[i])) return false;
  return true;
}

struct Sizes {
  std::int64_t in, out, saved;
};

// The byte extent of a staging block [tokens][heads][row] at a place.
std::int64_t block_end(const Place& p, std::int64_t tokens, std::int64_t heads, std::int64_t row) {
  const std::int64_t pitch = p.pitch ? p.pitch : heads;
  return p.offset + (tokens - 1) * pitch * row + heads * row;
}

std::string check_place(const Place& p, std::int64_t tokens, std::int64_t heads, std::int64_t row,
                        const Sizes& s) {
  if (tokens <= 0 || !detail::is_staging(p.slot)) return {};
  const std::int64_t size = p.slot == Slot::stage_in ? s.in : p.slot == Slot::stage_out ? s.out : s.saved;
  if (p.offset < 0 || block_end(p, tokens, heads, row) > size)
    return std::string(detail::slot_name(p.slot)) + " block at " + std::to_string(p.offset) +
           " ends past " + std::to_string(size);
  return {};
}

std::string check_geometry(const Geometry& g, bool canonical) {
  const int P = static_cast<int>(g.q_lens.size());
  const auto work = detail::split_work(detail::work_input(g));
  std::vector<BackwardProgram> progs;
  for (int r = 0; r < P; ++r) progs.push_back(detail::compile_uaa_backward(g, work, r, canonical));
  std::int64_t q_total = 0;
  for (auto x : g.q_lens) q_total += x;
  const std::int64_t row = g.head_dim * g.elem_bytes, f32_row = g.head_dim * 4;
  // [symmetry]
  for (int r = 0; r < P; ++r)
    for (int j = 0; j < P; ++j) {
      if (j == r) continue;
      const BackwardProgram& a = progs[r];
      const BackwardProgram& b = progs[j];
      for (auto step : {&BackwardProgram::in_saved, &BackwardProgram::in_recompute, &BackwardProgram::out})
        if (!same_parts(parts_to(a.*step, j, true), parts_to(b.*step, r, false)))
          return "[symmetry] exchange parts " + std::to_string(r) + " -> " + std::to_string(j);
      std::vector<Part> sent = parts_to(a.carry1, j, true), late = parts_to(a.carry2, j, true);
      sent.insert(sent.end(), late.begin(), late.end());
      if (!same_parts(sent, parts_to(b.carry1, r, false)) || !parts_to(b.carry2, r, false).empty())
        return "[symmetry] carry " + std::to_string(r) + " -> " + std::to_string(j);
    }
  // [bounds]
  for (int r = 0; r < P; ++r) {
    const BackwardProgram& p = progs[r];
    const Sizes mine{p.stage_in_bytes, p.stage_out_bytes, p.saved_bytes};
    for (const ExchangeStep* s : {&p.in_saved, &p.in_recompute, &p.carry1, &p.carry2, &p.out}) {
      for (const auto& pp : s->send)
        for (std::uint32_t i = pp.begin; i < pp.end; ++i) {
          const Part& x = s->send_parts[i];
          std::string e = check_place(x.src, x.tokens, x.heads, x.row_bytes, mine);
          const BackwardProgram& peer = progs[pp.peer];
          if (e.empty())
            e = check_place(x.dst, x.tokens, x.heads, x.row_bytes,
                            {peer.stage_in_bytes, peer.stage_out_bytes, peer.saved_bytes});
          if (!e.empty()) return "[bounds] rank " + std::to_string(r) + " send: " + e;
        }
    }
    for (const auto* steps : {&p.phase1, &p.phase2})
      for (const auto& c : *steps) {
        // A step reads its own heads of rows whose pitch is the segment's dense heads.
        auto pitched = [](Place p, std::int64_t dense) {
          if (p.pitch == 0) p.pitch = static_cast<std::int32_t>(dense);
          return p;
        };
        const std::int64_t group = g.q_heads / g.kv_heads;
        const std::int64_t kv_read = (c.q_head_begin + c.q_heads - 1) / group - c.kv_head_begin + 1;
        for (const auto& q : c.q)
          for (const Place* pl : {&q.q, &q.dout, &q.dq})
            if (std::string e = check_place(pitched(*pl, q.dense_heads), q.tokens, c.q_heads, row, mine); !e.empty())
              return "[bounds] rank " + std::to_string(r) + " step: " + e;
        for (const auto& k : c.kv)
          for (const Place* pl : {&k.k, &k.v})
            if (std::string e = check_place(pitched(*pl, k.dense_heads), k.tokens, kv_read, row, mine); !e.empty())
              return "[bounds] rank " + std::to_string(r) + " kv: " + e;
        std::int64_t kv_total = 0;
        for (auto x : g.kv_lens) kv_total += x;
        for (const Place* pl : {&c.dk_partial, &c.dv_partial})
          if (std::string e = check_place(*pl, kv_total * c.q_heads, 1, f32_row, mine); !e.empty())
            return "[bounds] rank " + std::to_string(r) + " partial: " + e;
      }
  }
  // [chain]: the rows of every head are computed exactly once, in ascending order: across ranks in
  // rank order, and within a rank in execution order (phase1, then phase2). A step that starts past
  // row 0 continues a chain: from the received carry when it is the rank's first rows of that head,
  // else in place (its carry is its own partial area).
  std::map<std::int64_t, std::int64_t> next_row;  // head -> first row not yet computed
  for (int r = 0; r < P; ++r) {
    const BackwardProgram& p = progs[r];
    std::map<std::int64_t, bool> seen;  // heads this rank has computed rows of
    std::vector<const detail::BackwardStep*> steps;
    for (const auto& c : p.phase1) steps.push_back(&c);
    for (const auto& c : p.phase2) steps.push_back(&c);
    for (const auto* c : steps) {
      std::int64_t rows = 0;
      for (const auto& q : c->q) rows += q.tokens;
      for (std::int64_t h = c->q_head_begin; h < c->q_head_begin + c->q_heads; ++h) {
        if (next_row[h] != c->q_first)
          return "[chain] rank " + std::to_string(r) + " head " + std::to_string(h) + " starts at row " +
                 std::to_string(c->q_first) + ", expected " + std::to_string(next_row[h]);
        next_row[h] = c->q_first + rows;
      }
      const bool first_of_head = !seen[c->q_head_begin];
      for (std::int64_t h = c->q_head_begin; h < c->q_head_begin + c->q_heads; ++h) seen[h] = true;
      const Slot carry = c->dk_carry.slot;
      const Slot want = c->q_first == 0 ? Slot::pad
                        : first_of_head ? (canonical ? Slot::stage_in : Slot::pad)
                                        : Slot::stage_out;
      if (carry != want || c->dv_carry.slot != want)
        return "[chain] rank " + std::to_string(r) + " head " + std::to_string(c->q_head_begin) +
               " rows from " + std::to_string(c->q_first) + ": carry from " + detail::slot_name(carry) +
               ", expected " + detail::slot_name(want);
      if (c->q_heads > 1 && c->q_first != 0)
        return "[chain] a step of several heads must cover whole heads";
      if (want == Slot::stage_out && !same_place(c->dk_carry, c->dk_partial))
        return "[chain] an in-place continuation must read its own partial sums";
    }
  }
  for (std::int64_t h = 0; h < g.q_heads && q_total > 0; ++h)
    if (next_row[h] != q_total) return "[chain] head " + std::to_string(h) + " not covered";
  // [reduce]
  const std::int64_t group = g.q_heads / g.kv_heads;
  for (int r = 0; r < P; ++r) {
    const auto& red = progs[r].reduce;
    for (std::int64_t kvh = 0; kvh < g.kv_heads; ++kvh) {
      const std::int64_t n = red.term_begin[kvh + 1] - red.term_begin[kvh];
      // canonical: one term per q head, except that the rank completing the group's first head
      // sends one block for every head of the group it also completes (pre-added);
      // by_rank: one per rank holding rows of the head.
      auto completer = [&](std::int64_t h) {  // the rank whose work holds (h, q_total - 1)
        for (int y = 0; y < P; ++y) {
          const auto& w = work[y];
          const bool after_start = w.first_head < h || (w.first_head == h && w.first_row <= q_total - 1);
          const bool before_end = h < w.end_head || (h == w.end_head && q_total - 1 < w.end_row);
          if (w.pieces > 0 && after_start && before_end) return y;
        }
        return -1;
      };
      std::int64_t want = 0;
      for (std::int64_t h = kvh * group; h < (kvh + 1) * group && q_total > 0 && g.kv_lens[r] > 0; ++h) {
        if (canonical) {
          want += h == kvh * group || completer(h) != completer(kvh * group);
          continue;
        }
        for (const auto& w : work)
          want += w.q_heads.begin <= h && h < w.q_heads.end && w.pieces > 0;
      }
      if (n != want)
        return "[reduce] rank " + std::to_string(r) + " kv head " + std::to_string(kvh) + " has " +
               std::to_string(n) + " terms, expected " + std::to_string(want);
    }
  }
  // [bytes]
  for (bool saved : {true, false}) {
    std::int64_t sent = 0, received = 0;
    for (const auto& p : progs) {
      sent += p.bytes_sent(saved);
      received += p.bytes_received(saved);
    }
    if (sent != received) return "[bytes] sent " + std::to_string(sent) + " != received " + std::to_string(received);
  }
  for (const auto& p : progs)
    if (p.bytes_sent(true) > p.bytes_sent(false)) return "[bytes] saved mode sends more";
  return {};
}

TEST(BackwardProgram, RandomGeometries) {
  Rng rng(2026);
  for (int trial = 0; trial < 600; ++trial) {
    Geometry g;
    const int P = static_cast<int>(rng.uniform(1, 9));
    const std::int64_t heads[] = {1, 2, 3, 4, 6, 7, 8, 24, 30, 40};
    g.q_heads = rng.pick(heads);
    const std::int64_t groups[] = {1, 2, 4, 8};
    std::int64_t grp = rng.pick(groups);
    while (g.q_heads % grp) grp /= 2;
    if (rng.uniform(0, 5) == 0) grp = g.q_heads;  // MQA
    g.kv_heads = g.q_heads / grp;
    g.head_dim = rng.uniform(1, 20);
    g.elem_bytes = rng.uniform(0, 1) ? 4 : 2;
    g.causal = rng.uniform(0, 1) == 1;
    g.with_lse = true;
    const std::int64_t max_len = rng.uniform(0, 1) ? 60 : 300;
    for (int r = 0; r < P; ++r) {
      g.q_lens.push_back(rng.uniform(0, 3) == 0 ? 0 : rng.uniform(0, max_len));
      g.kv_lens.push_back(rng.uniform(0, 3) == 0 ? 0 : rng.uniform(0, max_len));
    }
    // Documents (random cuts of both totals into the same count), batches (heads x B) and windows.
    if (rng.uniform(0, 2) == 0) {
      const int docs = static_cast<int>(rng.uniform(2, 7));
      auto starts = [&](const std::vector<std::int64_t>& lens) {
        std::int64_t total = 0;
        for (auto x : lens) total += x;
        std::vector<std::int64_t> cut = {0, total};
        for (int i = 1; i < docs; ++i) cut.push_back(rng.uniform(0, total));
        std::sort(cut.begin(), cut.end());
        return cut;
      };
      g.q_doc_start = starts(g.q_lens);
      g.kv_doc_start = starts(g.kv_lens);
    }
    if (rng.uniform(0, 3) == 0) {
      g.batch = rng.uniform(2, 3);
      g.q_heads *= g.batch;
      g.kv_heads *= g.batch;
    }
    if (rng.uniform(0, 3) == 0) {
      g.window_left = rng.uniform(-1, 40);
      g.window_right = rng.uniform(-1, 5);
    }
    const bool canonical = trial % 3 != 2;
    const std::string e = check_geometry(g, canonical);
    ASSERT_EQ(e, "") << (canonical ? "canonical" : "by_rank") << " trial " << trial << ": P " << P << " hq " << g.q_heads << " hkv " << g.kv_heads
                     << " causal " << g.causal << " batch " << g.batch << " documents "
                     << (g.q_doc_start.empty() ? 1 : g.q_doc_start.size() - 1);
  }
}

}  // namespace
}  // namespace uaa::test
