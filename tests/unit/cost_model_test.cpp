// The cost model (src/plan/cost_model.h), without MPI: its per-rank bytes, self bytes and FLOPs are
// checked rank by rank against the programs real plans compile (Plan::from_lengths on an in-process
// communicator), for every strategy over many small layouts.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <span>
#include <stdexcept>
#include <vector>

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

// FLOPs of a program's compute steps, counted the way the cost model counts them.
double program_flops(const Program& p, std::int64_t head_dim) {
  double flops = 0;
  for (const ComputeStep& c : p.compute) {
    std::int64_t rows = 0;
    for (const QuerySegment& q : c.q) rows += q.tokens;
    flops += 4.0 * static_cast<double>(head_dim) * static_cast<double>(c.q_heads) *
             visible_pairs(c.q_first, rows, c.q_total, c.kv_total, c.causal);
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

}  // namespace
