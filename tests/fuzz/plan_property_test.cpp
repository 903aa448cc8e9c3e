// Randomized property test of the exchange programs (FAILURE_MODEL.md §5): for random geometries
// (ranks, lengths with zeros, ones and primes, heads, GQA groups, head dim, element size, lse,
// causal) every rank's program of every strategy is compiled, and the properties of
// tests/unit/program_checks.h are checked across ranks: send/receive symmetry, bounds, no overlap,
// no wasted staging, byte counts, coverage of every output element, and a simulated transport run
// of every program in one process (the kernel's view of every compute step included). Every 16th
// case also builds the plans (Plan::from_lengths on every rank) and checks that they carry these
// very programs and report their bytes.
//
// Environment: UAA_PROPERTY_SEED (printed on failure), UAA_PROPERTY_CASES (how many),
// UAA_PROPERTY_CASE (check only case n of the seed's sequence: the failure message names it).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "plan/plan_data.h"
#include "uaa/error.h"
#include "uaa/plan.h"
#include "unit/fake_communicator.h"
#include "unit/program_checks.h"

namespace uaa::test {
namespace {

std::uint64_t env_u64(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::strtoull(v, nullptr, 0) : fallback;
}

detail::Geometry random_geometry(std::mt19937_64& rng) {
  auto pick = [&](std::int64_t lo, std::int64_t hi) {
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
  };
  static const std::int64_t palette[] = {0, 1, 2, 3, 5, 7, 13, 47, 48, 49, 97, 127};
  static const std::int64_t heads[] = {1, 3, 5, 7, 24, 30, 40};
  detail::Geometry g;
  const int P = static_cast<int>(pick(0, 7) == 0 ? pick(10, 40) : pick(1, 9));
  const int lens = static_cast<int>(pick(0, 2));  // tiny, moderate, awkward palette
  const bool cross = pick(0, 3) == 0, ulysses_shaped = pick(0, 5) == 0;
  // Many ranks hold fewer tokens (allgather_kv's staging is every rank's keys on every rank).
  const std::int64_t most = P > 9 ? 20 : 70;
  auto len = [&] { return lens == 0 ? pick(0, 5) : lens == 1 ? pick(0, most) : palette[pick(0, P > 9 ? 6 : 11)]; };
  const std::int64_t q0 = len(), kv0 = cross ? len() : q0;
  for (int r = 0; r < P; ++r) {
    g.q_lens.push_back(ulysses_shaped ? q0 : len());
    g.kv_lens.push_back(ulysses_shaped ? kv0 : cross ? len() : g.q_lens.back());
  }
  if (pick(0, 1)) {
    g.q_heads = heads[pick(0, 6)];
    std::vector<std::int64_t> div;
    for (std::int64_t d = 1; d <= g.q_heads; ++d)
      if (g.q_heads % d == 0) div.push_back(d);
    g.kv_heads = div[static_cast<std::size_t>(pick(0, static_cast<std::int64_t>(div.size()) - 1))];
  } else {
    g.kv_heads = pick(1, 6);
    g.q_heads = g.kv_heads * pick(1, 5);
  }
  if (ulysses_shaped) {  // q_heads a multiple of P
    g.kv_heads = P * (P <= 9 ? pick(1, 2) : 1);
    g.q_heads = g.kv_heads * pick(1, 3);
  }
  // Wide rows sometimes (the round trip then runs with head_dim 1 if it would be too large).
  g.head_dim = pick(0, 7) == 0 ? pick(1, 256) : pick(1, 9);
  g.elem_bytes = pick(0, 1) ? 2 : 4;
  g.with_lse = pick(0, 1);
  g.causal = pick(0, 1);
  // Windows (every strategy), documents and batches (uaa only).
  if (pick(0, 3) == 0) {
    static const std::int64_t sides[] = {-1, 0, 3, 50};
    g.window_left = sides[pick(0, 3)];
    g.window_right = sides[pick(0, 3)];
  }
  if (pick(0, 2) == 0) {
    const int docs = static_cast<int>(pick(2, 6));
    auto starts = [&](std::int64_t total) {
      std::vector<std::int64_t> cut = {0, total};
      for (int i = 1; i < docs; ++i) cut.push_back(pick(0, total));
      std::sort(cut.begin(), cut.end());
      return cut;
    };
    g.q_doc_start = starts(sum_of(g.q_lens));
    g.kv_doc_start = cross ? starts(sum_of(g.kv_lens)) : g.q_doc_start;
    if (!cross && sum_of(g.kv_lens) != sum_of(g.q_lens)) g.kv_doc_start = starts(sum_of(g.kv_lens));
  }
  if (pick(0, 3) == 0) {
    g.batch = pick(2, 3);
    g.q_heads *= g.batch;
    g.kv_heads *= g.batch;
  }
  return g;
}

bool uaa_only(const detail::Geometry& g) { return g.batch > 1 || g.q_doc_start.size() > 2; }

bool ulysses_accepts(const detail::Geometry& g) {
  const std::int64_t P = static_cast<std::int64_t>(g.q_lens.size());
  for (std::size_t r = 0; r < g.q_lens.size(); ++r)
    if (g.q_lens[r] != g.q_lens[0] || g.kv_lens[r] != g.kv_lens[0]) return false;
  return g.q_heads % P == 0;
}

// The plans of every rank carry the programs the generators compile, and report their bytes.
std::string check_plans(const detail::Geometry& g, Strategy st) {
  const int P = static_cast<int>(g.q_lens.size());
  AttentionShape s;
  s.q_heads = g.q_heads / g.batch;
  s.kv_heads = g.kv_heads / g.batch;
  s.batch = g.batch;
  s.window_left = g.window_left;
  s.window_right = g.window_right;
  s.head_dim = g.head_dim;
  s.dtype = g.elem_bytes == 2 ? DType::bf16 : DType::f32;
  s.causal = g.causal;
  s.return_lse = g.with_lse;
  PlanOptions o;
  o.strategy = st;
  std::vector<detail::Program> programs;
  for (int r = 0; r < P; ++r) {
    auto comm = std::make_shared<FakeCommunicator>(r, P);
    Documents docs;
    for (std::size_t d = 0; d + 1 < g.q_doc_start.size(); ++d) {
      docs.q.push_back(g.q_doc_start[d + 1] - g.q_doc_start[d]);
      docs.kv.push_back(g.kv_doc_start[d + 1] - g.kv_doc_start[d]);
    }
    const Plan plan = Plan::from_lengths(*comm, s, g.q_lens, g.kv_lens, docs, o);
    const detail::Program& p = detail::plan_data(plan).forward;
    const detail::Program want = compile_one(g, gen_of(st), r, detail::plan_data(plan).work);
    if (detail::describe(p) != detail::describe(want))
      return "rank " + std::to_string(r) + "'s plan (" + strategy_name(st) +
             ") does not carry the program its geometry compiles to:\n" + detail::describe(p) +
             "instead of\n" + detail::describe(want);
    if (plan.bytes_sent() != p.bytes_sent() || plan.bytes_received() != p.bytes_received() ||
        plan.staging_bytes() != p.stage_in_bytes + p.stage_out_bytes)
      return "rank " + std::to_string(r) + "'s plan reports other bytes than its program";
    programs.push_back(p);
  }
  return check_programs(g, programs, gen_of(st)).problem;
}

TEST(ProgramProperty, RandomGeometriesAgreeAcrossRanksAndRoundTrip) {
  const std::uint64_t seed = env_u64("UAA_PROPERTY_SEED", 20240601);
  const std::uint64_t cases = env_u64("UAA_PROPERTY_CASES", 3000);
  const std::uint64_t only = env_u64("UAA_PROPERTY_CASE", ~std::uint64_t{0});
  std::mt19937_64 rng(seed);
  std::uint64_t round_trips = 0, checked = 0;
  for (std::uint64_t n = 0; n < cases && n <= only; ++n) {
    const detail::Geometry g = random_geometry(rng);
    const bool plans = n % 16 == 0;
    const std::uint64_t pick = rng();
    if (only != ~std::uint64_t{0} && n != only) continue;
    std::string problem;
    try {
      for (Gen k : {Gen::uaa, Gen::padded, Gen::allgather}) {
        if (k != Gen::uaa && uaa_only(g)) continue;
        const CheckResult res = compile_and_check(g, k);
        round_trips += !res.round_trip_skipped;
        ++checked;
        if (!res.problem.empty()) {
          problem = res.problem;
          break;
        }
      }
      if (problem.empty() && plans) {
        std::vector<Strategy> st = {Strategy::uaa, Strategy::ulysses_pad, Strategy::allgather_kv};
        if (ulysses_accepts(g)) st.push_back(Strategy::ulysses);
        if (uaa_only(g)) st = {Strategy::uaa};
        problem = check_plans(g, st[pick % st.size()]);
      }
    } catch (const std::exception& e) {
      problem = std::string("threw: ") + e.what();
    }
    ASSERT_TRUE(problem.empty()) << problem << "\n  case " << n << ": " << geometry_str(g)
                                 << "\n  reproduce: UAA_PROPERTY_SEED=" << seed
                                 << " UAA_PROPERTY_CASE=" << n;
  }
  // The simulation must actually run (large cases fall back to head_dim 1, never to nothing).
  EXPECT_EQ(round_trips, checked);
}

}  // namespace
}  // namespace uaa::test
