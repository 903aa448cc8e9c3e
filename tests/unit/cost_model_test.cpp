// The cost model (src/plan/cost_model.h), without MPI: its per-rank bytes, self bytes and FLOPs are
// checked rank by rank against the programs real plans compile (Plan::from_lengths on an in-process
// communicator), for every strategy over many small layouts; with packed documents, batches and
// windows its FLOPs are checked against visible pairs counted one by one inside each document, and
// the long-tailed document preset of `uaa plan` / `uaa bench docs` (bench/presets.h) is checked to
// split within 2% of even.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <stdexcept>
#include <vector>

#include "../../bench/presets.h"  // the docs-longtail preset (tests/unit does not see bench/)
#include "kernels/kernel.h"
#include "plan/cost_model.h"
#include "plan/plan_data.h"
#include "uaa/communicator.h"
#include "uaa/plan.h"

namespace {

using namespace uaa::detail;
using uaa::Strategy;
using Lens = std::vector<std::int64_t>;

// Rank `rank` of `size` in one process: Plan::from_lengths communicates nothing.
class LoneRank final : public uaa::Communicator {
 public:
  LoneRank(int rank, int size) : rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* transport() const override { return "test-lone-rank"; }
  void allgather(const void*, std::size_t, void*) override { throw std::logic_error("allgather"); }
  void exchange(std::span<const uaa::Message>, std::span<const uaa::Message>) override {
    throw std::logic_error("exchange");
  }

 private:
  int rank_, size_;
};

Geometry geometry(Lens q, Lens kv, std::int64_t hq, std::int64_t hkv, std::int64_t d, bool causal,
                  bool lse = false, std::int64_t elem_bytes = 4) {
  Geometry g;
  g.q_lens = std::move(q);
  g.kv_lens = std::move(kv);
  g.q_heads = hq;
  g.kv_heads = hkv;
  g.head_dim = d;
  g.elem_bytes = elem_bytes;
  g.causal = causal;
  g.with_lse = lse;
  return g;
}

uaa::Plan plan_of(const Geometry& g, Strategy st, int rank) {
  auto comm = std::make_shared<LoneRank>(rank, static_cast<int>(g.q_lens.size()));
  uaa::AttentionShape s;
  s.q_heads = g.q_heads;
  s.kv_heads = g.kv_heads;
  s.head_dim = g.head_dim;
  s.dtype = g.elem_bytes == 2 ? uaa::DType::bf16 : uaa::DType::f32;
  s.causal = g.causal;
  s.return_lse = g.with_lse;
  uaa::PlanOptions o;
  o.strategy = st;
  return uaa::Plan::from_lengths(*comm, s, g.q_lens, g.kv_lens, o);
}

// FLOPs of a program's compute steps, counted the way the cost model counts them: per kernel call
// (one per document span of a step), visible pairs of its rows under its mask and window.
double program_flops(const Program& p, std::int64_t head_dim) {
  double flops = 0;
  auto add = [&](const ComputeStep& c, std::uint32_t q_begin, std::uint32_t q_end, std::int64_t q_first,
                 std::int64_t q_total, std::int64_t kv_total) {
    std::int64_t rows = 0;
    for (std::uint32_t i = q_begin; i < q_end; ++i) rows += c.q[i].tokens;
    flops += 4.0 * static_cast<double>(head_dim) * static_cast<double>(c.q_heads) *
             static_cast<double>(visible_key_pairs(q_first, rows, q_total, kv_total, c.causal,
                                                   c.window_left, c.window_right));
  };
  for (const ComputeStep& c : p.compute) {
    if (c.docs.empty()) add(c, 0, static_cast<std::uint32_t>(c.q.size()), c.q_first, c.q_total, c.kv_total);
    for (const DocSpan& d : c.docs) add(c, d.q_begin, d.q_end, d.q_first, d.q_total, d.kv_total);
  }
  return flops;
}

// Bytes of an exchange step that go from the rank to itself.
std::int64_t self_bytes(const ExchangeStep& s) {
  std::int64_t n = 0;
  for (const PeerParts& pp : s.send)
    if (pp.peer == s.self)
      for (std::uint32_t i = pp.begin; i < pp.end; ++i) n += s.send_parts[i].bytes();
  return n;
}

bool ulysses_runs(const Geometry& g) {
  const auto P = static_cast<std::int64_t>(g.q_lens.size());
  std::int64_t q = 0, kv = 0;
  for (std::int64_t x : g.q_lens) q += x;
  for (std::int64_t x : g.kv_lens) kv += x;
  if (q % P || kv % P || g.q_heads % P) return false;
  for (std::int64_t j = 0; j < P; ++j)
    if (g.q_lens[j] != q / P || g.kv_lens[j] != kv / P) return false;
  return true;
}

// Every rank's model against its real plan.
void expect_model_is_plan(const Geometry& g, Strategy st) {
  const CostEstimate c = estimate_cost(g, st);
  const int P = static_cast<int>(g.q_lens.size());
  ASSERT_EQ(static_cast<int>(c.ranks.size()), P);
  for (int r = 0; r < P; ++r) {
    const uaa::Plan plan = plan_of(g, st, r);
    const Program& prog = plan_data(plan).forward;
    SCOPED_TRACE(testing::Message() << uaa::strategy_name(st) << " rank " << r << " of " << P
                                    << " heads " << g.q_heads << "/" << g.kv_heads
                                    << (g.causal ? " causal" : "") << (g.with_lse ? " lse" : ""));
    EXPECT_EQ(c.ranks[r].sent, plan.bytes_sent());
    EXPECT_EQ(c.ranks[r].received, plan.bytes_received());
    EXPECT_EQ(c.ranks[r].self, self_bytes(prog.in) + self_bytes(prog.out));
    EXPECT_DOUBLE_EQ(c.ranks[r].flops, program_flops(prog, g.head_dim));
  }
}

TEST(CostModel, VisiblePairsMatchCounting) {
  for (bool causal : {false, true})
    for (std::int64_t sq : {0, 1, 7, 50})
      for (std::int64_t skv : {0, 1, 9, 50, 64})
        for (std::int64_t first = 0; first <= sq; first += 3) {
          const std::int64_t n = std::min<std::int64_t>(5, sq - first);
          double want = 0;
          for (std::int64_t i = first; i < first + n; ++i)
            want += static_cast<double>(
                std::max<std::int64_t>(last_visible_key(i, sq, skv, causal) + 1, 0));
          EXPECT_EQ(visible_pairs(first, n, sq, skv, causal), want)
              << causal << " " << sq << " " << skv << " " << first;
        }
}

// The model's bytes are the bytes the plans send: checked rank by rank against Plan::bytes_sent().
TEST(CostModel, BytesAreWhatThePlansSend) {
  const Lens q = {11, 0, 23, 5, 8}, kv = {7, 13, 0, 9, 1};
  for (Strategy st : {Strategy::uaa, Strategy::ulysses_pad, Strategy::allgather_kv})
    expect_model_is_plan(geometry(q, kv, 6, 2, 16, true, true), st);
}

TEST(CostModel, BytesAreWhatThePlansSendOverManyLayouts) {
  std::mt19937 rng(12345);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const std::int64_t heads[][2] = {{1, 1}, {2, 1}, {4, 4}, {6, 2}, {7, 7}, {12, 3}, {30, 30}, {32, 8}};
  for (int trial = 0; trial < 200; ++trial) {
    const int P = pick(1, 9);
    Lens q(P), kv(P);
    const bool same_kv = pick(0, 1) == 0, even = pick(0, 3) == 0;
    for (int r = 0; r < P; ++r) {
      q[r] = even ? 48 : pick(0, 3) == 0 ? 0 : pick(1, 130);
      kv[r] = same_kv ? q[r] : pick(0, 70);
    }
    const auto& h = heads[pick(0, 7)];
    const Geometry g = geometry(q, kv, h[0], h[1], pick(0, 1) ? 8 : 24, pick(0, 1) == 1,
                                pick(0, 1) == 1, pick(0, 1) ? 2 : 4);
    for (Strategy st : {Strategy::uaa, Strategy::ulysses_pad, Strategy::allgather_kv})
      expect_model_is_plan(g, st);
    if (ulysses_runs(g)) expect_model_is_plan(g, Strategy::ulysses);
  }
}

TEST(CostModel, FlopsAndImbalance) {
  // 10 tokens, 4 heads, D 8, 3 ranks, full attention: 4 * 8 * 100 FLOPs per head.
  const Lens lens = {4, 3, 3};
  const double per_head = 4.0 * 8 * 10 * 10;
  const Geometry g = geometry(lens, lens, 4, 4, 8, false);
  const CostEstimate u = estimate_cost(g, Strategy::uaa);
  EXPECT_EQ(u.max_flops, 2 * per_head);  // heads 2, 1, 1
  EXPECT_DOUBLE_EQ(u.imbalance, 2 / (4.0 / 3));
  const CostEstimate p = estimate_cost(g, Strategy::ulysses_pad);
  // 2 padded heads per rank, 2 padded query rows attending all 10 keys.
  EXPECT_EQ(p.max_flops, 2 * (per_head + 4.0 * 8 * 2 * 10));
  EXPECT_DOUBLE_EQ(p.pad_fraction, 1 - (10.0 * 4) / (12 * 6));
  const CostEstimate a = estimate_cost(g, Strategy::allgather_kv);
  EXPECT_EQ(a.max_flops, 4 * 4.0 * 8 * 4 * 10);
  EXPECT_GT(modelled_ms(p, {1e9, 1e9}), modelled_ms(u, {1e9, 1e9}));
  EXPECT_EQ(busiest_rank(u, {1e9, 1e9}), 0);  // the rank with two heads
}

// At rank counts where building every rank's plan is out of the question: what is sent is what is
// received, over all ranks, and every rank's work is there (uaa computes every (head, row) once).
TEST(CostModel, ConservesBytesAtLargeRankCounts) {
  for (int P : {4096, 65536}) {
    Lens q(P), kv(P);
    for (int r = 0; r < P; ++r) {
      q[r] = (r * 7919) % 97;
      kv[r] = (r * 104729) % 61;
    }
    const Geometry g = geometry(q, kv, 24, 8, 128, true, true);
    for (Strategy st : {Strategy::uaa, Strategy::ulysses_pad, Strategy::allgather_kv}) {
      const CostEstimate c = estimate_cost(g, st);
      __int128 sent = 0, received = 0;
      for (const RankCost& rc : c.ranks) {
        EXPECT_GE(rc.sent, 0);
        EXPECT_GE(rc.received, 0);
        sent += rc.sent;
        received += rc.received;
      }
      EXPECT_TRUE(sent == received) << uaa::strategy_name(st) << " at " << P;
    }
    // Every rank's bytes at a few ranks, against its real plan (O(P) each).
    const CostEstimate c = estimate_cost(g, Strategy::uaa);
    for (int r : {0, P / 2, P - 1}) {
      const uaa::Plan plan = plan_of(g, Strategy::uaa, r);
      EXPECT_EQ(c.ranks[r].sent, plan.bytes_sent()) << r << " of " << P;
      EXPECT_EQ(c.ranks[r].received, plan.bytes_received()) << r << " of " << P;
    }
  }
}

// ---- Packed documents, batches, windows ----

struct DocCase {
  Lens q_lens, kv_lens;
  uaa::Documents docs;
  std::int64_t heads = 6, kv_heads = 2, head_dim = 16, batch = 1;
  bool causal = false;
  std::int64_t window_left = -1, window_right = -1;
};

uaa::Plan doc_plan(const DocCase& c, Strategy st, int rank, bool lse) {
  auto comm = std::make_shared<LoneRank>(rank, static_cast<int>(c.q_lens.size()));
  uaa::AttentionShape s;
  s.q_heads = c.heads;
  s.kv_heads = c.kv_heads;
  s.head_dim = c.head_dim;
  s.causal = c.causal;
  s.return_lse = lse;
  s.batch = c.batch;
  s.window_left = c.window_left;
  s.window_right = c.window_right;
  uaa::PlanOptions o;
  o.strategy = st;
  return uaa::Plan::from_lengths(*comm, s, c.q_lens, c.kv_lens, c.docs, o);
}

// Visible (query, key) pairs of one document of nq queries and nk keys, counted pair by pair with
// plan.h's conventions (bottom-right aligned causal mask and window inside the document).
double counted_pairs(std::int64_t nq, std::int64_t nk, bool causal, std::int64_t left,
                     std::int64_t right) {
  double n = 0;
  for (std::int64_t i = 0; i < nq; ++i) {
    const std::int64_t at = i + nk - nq;  // the query's aligned position
    for (std::int64_t j = 0; j < nk; ++j) {
      if (causal && j > at) continue;
      if (left >= 0 && j < at - left) continue;
      if (right >= 0 && j > at + right) continue;
      ++n;
    }
  }
  return n;
}

Lens random_cut(std::int64_t total, int P, std::mt19937& rng) {
  Lens cut(P, 0);
  for (std::int64_t t = 0; t < total; ++t) ++cut[std::uniform_int_distribution<int>(0, P - 1)(rng)];
  if (P > 2) {  // a rank with no tokens
    cut[1] += cut[2];
    cut[2] = 0;
  }
  return cut;
}

// The model of a plan with documents (through the plan's own geometry, as `uaa plan` builds it):
// its FLOPs summed over the ranks are 4 * D * heads * batch * the visible pairs inside the
// documents, and every rank's FLOPs and bytes are those of the program that rank compiles.
TEST(CostModel, DocumentsFlopsAreVisiblePairsInsideDocuments) {
  std::mt19937 rng(2026);
  const Lens doc_sets[][2] = {{{5, 0, 17, 48, 100, 1}, {}},
                              {{5, 0, 17, 48, 100, 1}, {9, 3, 0, 60, 70, 29}},  // cross attention
                              {{200}, {}},
                              {{1, 1, 1, 1, 60, 1, 1, 97}, {}}};
  const std::int64_t windows[][2] = {{-1, -1}, {8, -1}, {3, 2}, {-1, 0}, {0, 0}, {50, 7}};
  int checked = 0;
  for (const auto& ds : doc_sets)
    for (bool causal : {false, true})
      for (const auto& w : windows)
        for (std::int64_t batch : {1, 2})
          for (int P : {1, 2, 3, 5}) {
            DocCase c;
            c.docs.q = ds[0];
            c.docs.kv = ds[1];
            const Lens& kv_docs = ds[1].empty() ? ds[0] : ds[1];
            std::int64_t q_total = 0, kv_total = 0;
            for (std::int64_t x : ds[0]) q_total += x;
            for (std::int64_t x : kv_docs) kv_total += x;
            c.q_lens = random_cut(q_total, P, rng);
            c.kv_lens = random_cut(kv_total, P, rng);
            c.causal = causal;
            c.window_left = w[0];
            c.window_right = w[1];
            c.batch = batch;
            double pairs = 0;
            for (std::size_t d = 0; d < ds[0].size(); ++d)
              pairs += counted_pairs(ds[0][d], kv_docs[d], causal, w[0], w[1]);
            const double want = 4.0 * static_cast<double>(c.head_dim * c.heads * batch) * pairs;
            const bool lse = (checked % 2) == 1;
            const Geometry g = geometry_of(plan_data(doc_plan(c, Strategy::uaa, 0, lse)));
            const CostEstimate model = estimate_cost(g, Strategy::uaa);
            SCOPED_TRACE(testing::Message() << "docs " << ds[0].size() << (ds[1].empty() ? "" : " cross")
                                            << (causal ? " causal" : "") << " window " << w[0] << ","
                                            << w[1] << " batch " << batch << " P " << P);
            double total = 0;
            for (const RankCost& rc : model.ranks) total += rc.flops;
            EXPECT_DOUBLE_EQ(total, want);
            for (int r = 0; r < P; ++r) {
              const uaa::Plan plan = doc_plan(c, Strategy::uaa, r, lse);
              EXPECT_DOUBLE_EQ(model.ranks[r].flops, program_flops(plan_data(plan).forward, c.head_dim))
                  << "rank " << r;
              EXPECT_EQ(model.ranks[r].sent, plan.bytes_sent()) << "rank " << r;
              EXPECT_EQ(model.ranks[r].received, plan.bytes_received()) << "rank " << r;
            }
            ++checked;
          }
  EXPECT_EQ(checked, 4 * 2 * 6 * 2 * 4);
}

// bench/presets.h's docs-longtail: its lengths are fixed (the generator is integer-only, so every
// platform gets this list; a change to it changes every published figure), and the work split of
// the model balances it within 2% at 2, 3, 4 and 8 ranks (a property of the split: pure counting).
TEST(CostModel, LongtailDocumentPresetIsBalanced) {
  const uaa::bench::DocPreset& p = *uaa::bench::find_doc_preset("docs-longtail");
  const Lens docs = uaa::bench::preset_documents(p);
  const Lens want = {2030, 102, 106, 2056, 593,  33,  1641, 407, 611, 360, 68,  48,  220,
                     210,  40,  112, 84,   106,  65,  86,   1272, 91, 11,  298, 75,  1491,
                     182,  409, 185, 1825, 257,  687, 40,   338, 49,  99,  2388, 47,  135,
                     85,   24,  8041, 53,  947,  175, 19,   126, 291, 148, 668, 57,  141,
                     492,  152, 113, 276,  204,  46,  518,  197, 635, 57,  347, 99};
  EXPECT_EQ(docs, want);
  std::int64_t total = 0;
  double pairs = 0;
  for (std::int64_t d : docs) {
    total += d;
    pairs += static_cast<double>(d) * static_cast<double>(d + 1) / 2;  // causal, self attention
  }
  EXPECT_EQ(total, 32768);
  EXPECT_EQ(static_cast<int>(docs.size()), 64);
  for (int P : {2, 3, 4, 8}) {
    DocCase c;
    c.q_lens = c.kv_lens = Lens(P, 32768 / P);
    for (std::int64_t r = 0; r < 32768 % P; ++r) {
      ++c.q_lens[r];
      ++c.kv_lens[r];
    }
    c.docs.q = docs;
    c.heads = p.heads;
    c.kv_heads = p.kv_heads;
    c.head_dim = p.head_dim;
    c.causal = p.causal;
    const Geometry g = geometry_of(plan_data(doc_plan(c, Strategy::uaa, 0, false)));
    const CostEstimate model = estimate_cost(g, Strategy::uaa);
    double flops = 0;
    for (const RankCost& rc : model.ranks) flops += rc.flops;
    EXPECT_DOUBLE_EQ(flops, 4.0 * 128 * 32 * pairs) << P;
    EXPECT_LE(model.imbalance, 1.02) << P << " ranks";
  }
}

}  // namespace
