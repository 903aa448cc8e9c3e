// The four strategies (uaa, ulysses, ulysses_pad, allgather_kv) on real MPI ranks: every one must give
// exactly the output of uaa (bitwise: they hand the kernel the same rows at the same global key
// positions), for awkward lengths (0, primes, totals that do not divide), heads that do not divide by
// the rank count, GQA/MQA, causal masks, cross lengths, log-sum-exp and strided caller buffers; and
// ulysses must refuse a layout it cannot run with the same error on every rank.
#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "attention_harness.h"
#include "mpi_test_util.h"
#include "uaa/attention.h"
#include "uaa/error.h"
#include "uaa/mpi.h"
#include "uaa/plan.h"

namespace uaa::test {
namespace {

constexpr Strategy kStrategies[] = {Strategy::uaa, Strategy::ulysses, Strategy::ulysses_pad,
                                    Strategy::allgather_kv};

struct Case {
  const char* name;
  std::int64_t hq, hkv, dim;
  bool causal, lse;
  // Per-rank lengths as a function of (rank, ranks); kv == nullptr means self-attention.
  std::int64_t (*q)(int r, int P);
  std::int64_t (*kv)(int r, int P);
  Layout layout;
};

std::int64_t primes(int r, int) {
  static const std::int64_t p[] = {97, 13, 0, 113, 1, 31, 7, 53};
  return p[r % 8];
}
std::int64_t zero_first(int r, int) { return r == 0 ? 0 : 29 + 5 * r; }
std::int64_t cross_kv(int r, int P) { return r == P - 1 ? 0 : 41 + 3 * r; }
std::int64_t even24(int, int) { return 24; }
std::int64_t one_token(int r, int) { return r % 2; }

const Case kCases[] = {
    {"primes_h5_full", 5, 5, 32, false, false, primes, nullptr, Layout::contiguous},
    {"primes_gqa6x2_causal", 6, 2, 16, true, false, primes, nullptr, Layout::padded},
    {"zero_first_h7_mqa_causal_lse", 7, 1, 24, true, true, zero_first, nullptr, Layout::head_major},
    {"cross_h3_causal", 3, 3, 16, true, false, zero_first, cross_kv, Layout::contiguous},
    {"cross_gqa4x2_full_lse", 4, 2, 8, false, true, primes, cross_kv, Layout::head_major_padded},
    {"one_token_h30", 30, 30, 8, false, false, one_token, nullptr, Layout::contiguous},
    {"even_divides_h8x4_causal", 8, 4, 16, true, true, even24, nullptr, Layout::padded},
};

Problem problem_of(const Case& c, int P) {
  AttentionShape s;
  s.q_heads = c.hq;
  s.kv_heads = c.hkv;
  s.head_dim = c.dim;
  s.causal = c.causal;
  s.return_lse = c.lse;
  std::vector<std::int64_t> q(P), kv(P);
  for (int r = 0; r < P; ++r) {
    q[r] = c.q(r, P);
    kv[r] = c.kv ? c.kv(r, P) : q[r];
  }
  return make_problem(s, q, kv, 1234);
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

class StrategyCase : public ::testing::TestWithParam<Case> {};

TEST_P(StrategyCase, EveryStrategyMatchesUaaBitwise) {
  const Case& c = GetParam();
  const int P = world_size(), me = world_rank();
  Problem pb = problem_of(c, P);
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  Layouts layouts;
  layouts.q = layouts.k = layouts.v = layouts.out = c.layout;
  Workspace ws;  // shared by all strategies: stale bytes of one must not leak into another
  std::vector<RunResult> results;
  std::vector<Outcome> outcomes;
  for (Strategy st : kStrategies) {
    RunResult r;
    outcomes.push_back(capture([&] {
      const Plan plan = Plan::create(*comm, pb.shape, pb.q_lens[me], pb.kv_lens[me], {.strategy = st});
      r = run_shard(plan, pb, layouts, ws);
    }));
    results.push_back(r);
  }
  const bool ulysses_runs = [&] {
    std::int64_t q = pb.q_total(), kv = pb.kv_total();
    if (q % P || kv % P || c.hq % P) return false;
    for (int r = 0; r < P; ++r)
      if (pb.q_lens[r] != q / P || pb.kv_lens[r] != kv / P) return false;
    return true;
  }();
  for (std::size_t i = 0; i < results.size(); ++i) {
    const Strategy st = kStrategies[i];
    if (st == Strategy::ulysses && !ulysses_runs) {
      expect_same_error_everywhere(outcomes[i], ErrorCode::invalid_argument, -1,
                                   {"strategy ulysses needs"});
      continue;
    }
    expect_ok_everywhere(outcomes[i]);
    if (outcomes[i].kind != Outcome::ok) continue;
    EXPECT_TRUE(results[i].out_gaps_intact) << strategy_name(st) << " wrote outside the rows";
    EXPECT_TRUE(same_bits(results[i].out, results[0].out))
        << strategy_name(st) << " differs from uaa on rank " << me << ", " << pb.str();
    EXPECT_TRUE(same_bits(results[i].lse, results[0].lse))
        << strategy_name(st) << " lse differs from uaa on rank " << me;
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, StrategyCase, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Strategy, UlyssesRefusesATotalThatDoesNotDivideOnEveryRank) {
  const int P = world_size(), me = world_rank();
  if (P == 1) GTEST_SKIP() << "every total divides by 1";
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  AttentionShape s;
  s.q_heads = 2 * P;
  s.head_dim = 8;
  PlanOptions options;
  options.strategy = Strategy::ulysses;
  // P * 10 + 1 tokens: rank 0 holds one more.
  const std::int64_t mine = 10 + (me == 0 ? 1 : 0);
  const Outcome o = capture([&] { Plan::create(*comm, s, mine, mine, options); });
  expect_same_error_everywhere(o, ErrorCode::invalid_argument, -1,
                               {"strategy ulysses needs the query total to divide",
                                std::to_string(10 * P + 1) + " tokens over " + std::to_string(P)});
}

TEST(Strategy, RanksThatDisagreeOnTheStrategyGetAMismatch) {
  const int P = world_size(), me = world_rank();
  if (P == 1) GTEST_SKIP();
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  AttentionShape s;
  s.q_heads = 3;
  s.head_dim = 8;
  PlanOptions options;
  options.strategy = me == P - 1 ? Strategy::ulysses_pad : Strategy::uaa;
  const Outcome o = capture([&] { Plan::create(*comm, s, 5, 5, options); });
  expect_same_error_everywhere(o, ErrorCode::mismatch, P - 1, {"strategy", "ulysses_pad"});
}

}  // namespace
}  // namespace uaa::test
