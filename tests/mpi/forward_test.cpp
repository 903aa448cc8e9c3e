// forward() on real MPI ranks: every case is checked (1) against the float64 reference with a
// tolerance tied to what plain fp32 attention achieves on the same inputs, and (2) bitwise against
// the whole problem run through the library on a single rank — the exactness property of DESIGN §5.
//
// Cases are parameterized over shapes, masks, layouts and plan construction; per-rank lengths are
// drawn from the case seed and the world size, so every rank of a world agrees on them, and each
// world size (CTest runs this binary at 1, 2, 3, 4, 5, 7, 8 ranks) gets its own uneven split.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "attention_harness.h"
#include "common/test_rng.h"
#include "mpi_test_util.h"
#include "uaa/attention.h"
#include "uaa/error.h"
#include "uaa/mpi.h"
#include "uaa/plan.h"
#include "uaa/threads.h"
#include "kernels/kernel.h"

namespace uaa::test {
namespace {

enum class Lens { random, kv_empty, q_empty, all_empty, one_rank, single_token };
enum class Cross { self, kv_longer, kv_shorter };
enum class Mix { contiguous, head_major, padded, mixed };

struct Case {
  std::int64_t hq, hkv, dim;
  bool causal, lse;
  Cross cross;
  Mix mix;
  bool create;  // Plan::create (collective) or Plan::from_lengths (local)
  Lens lens;
  std::int64_t max_len;  // per rank
  std::uint64_t seed;
  float scale = 0.0f;
  DType dtype = DType::f32;
};

std::string case_name(const Case& c) {
  static const char* lens[] = {"rand", "kvEmpty", "qEmpty", "allEmpty", "oneRank", "oneToken"};
  static const char* cross[] = {"self", "kvLonger", "kvShorter"};
  static const char* mix[] = {"contig", "headMajor", "padded", "mixed"};
  std::ostringstream os;
  os << "h" << c.hq << "kv" << c.hkv << "d" << c.dim << "_" << (c.causal ? "causal" : "full") << "_"
     << (c.lse ? "lse_" : "") << cross[int(c.cross)] << "_" << mix[int(c.mix)] << "_"
     << (c.create ? "create" : "fromLengths") << "_" << lens[int(c.lens)] << "_s" << c.seed
     << (c.scale != 0.0f ? "_scaled" : "") << (c.dtype == DType::bf16 ? "_bf16" : "");
  return os.str();
}

// gtest prints a failing parameter with this instead of its bytes.
void PrintTo(const Case& c, std::ostream* os) { *os << case_name(c); }

Layouts layouts_of(Mix m) {
  Layouts l;
  switch (m) {
    case Mix::contiguous: break;
    case Mix::head_major:
      l.q = l.k = l.v = l.out = Layout::head_major;
      break;
    case Mix::padded:
      l.q = l.k = l.v = l.out = Layout::padded;
      l.lse_pad = 3;
      break;
    case Mix::mixed:
      l.q = Layout::head_major;
      l.k = Layout::padded;
      l.v = Layout::contiguous;
      l.out = Layout::head_major_padded;
      l.lse_pad = 1;
      break;
  }
  return l;
}

std::int64_t total(const std::vector<std::int64_t>& v) {
  std::int64_t s = 0;
  for (auto x : v) s += x;
  return s;
}

// Per-rank lengths for world size P: awkward on purpose (0, 1, primes, totals rarely divisible by P).
void make_lengths(const Case& c, int P, std::vector<std::int64_t>& q, std::vector<std::int64_t>& kv) {
  Rng rng(c.seed * 1000003u + static_cast<std::uint64_t>(P));
  const std::int64_t palette[] = {0, 1, 2, 3, 5, 7, 11, 13, 17, 23, 29, 31, 37};
  auto draw = [&] {
    std::int64_t n = rng.uniform(0, 2) == 0 ? rng.uniform(0, c.max_len) : rng.pick(palette);
    return std::min(n, c.max_len);
  };
  q.assign(P, 0);
  kv.assign(P, 0);
  for (int r = 0; r < P; ++r) q[r] = draw();
  if (P >= 3) q[c.seed % P] = 0;  // an empty rank in the middle of the sequence
  if (total(q) == 0) q[(c.seed + 1) % P] = 1 + rng.uniform(0, c.max_len);
  switch (c.cross) {
    case Cross::self:
      kv = q;
      break;
    case Cross::kv_longer:
      for (int r = 0; r < P; ++r) kv[r] = draw();
      if (total(kv) <= total(q)) kv[(c.seed + 1) % P] += total(q) - total(kv) + 1 + rng.uniform(0, 5);
      break;
    case Cross::kv_shorter:
      for (int r = 0; r < P; ++r) kv[r] = draw() / 2;
      while (total(kv) >= total(q)) {
        const int r = static_cast<int>(rng.uniform(0, P - 1));
        if (kv[r] > 0) --kv[r];
      }
      break;
  }
  switch (c.lens) {
    case Lens::random: break;
    case Lens::kv_empty: kv.assign(P, 0); break;
    case Lens::q_empty: q.assign(P, 0); break;
    case Lens::all_empty:
      q.assign(P, 0);
      kv.assign(P, 0);
      break;
    case Lens::one_rank: {
      const std::int64_t nq = total(q), nkv = total(kv);
      q.assign(P, 0);
      kv.assign(P, 0);
      q[P - 1] = nq;
      kv[P - 1] = nkv;
      break;
    }
    case Lens::single_token:
      q.assign(P, 0);
      q[P / 2] = 1;
      if (c.cross == Cross::self) kv = q;
      break;
  }
}

// Largest |a - b| over all elements; NaN counts as infinitely wrong.
template <typename A, typename B>
double max_abs_diff(const std::vector<A>& a, const std::vector<B>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();
    m = std::max(m, d);
  }
  return m;
}

// Like max_abs_diff for lse, over entries whose reference is finite; entries whose reference is
// -inf (rows that see no key) must be exactly -inf and are checked separately.
template <typename A>
double max_lse_diff(const std::vector<A>& a, const std::vector<double>& ref) {
  if (a.size() != ref.size()) return std::numeric_limits<double>::infinity();
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::isinf(ref[i])) continue;
    const double d = std::fabs(static_cast<double>(a[i]) - ref[i]);
    if (std::isnan(d)) return std::numeric_limits<double>::infinity();
    m = std::max(m, d);
  }
  return m;
}

bool bitwise_equal(const float* a, const float* b, std::size_t n) {
  return n == 0 || std::memcmp(a, b, n * sizeof(float)) == 0;
}

class ForwardCase : public ::testing::TestWithParam<Case> {};

TEST_P(ForwardCase, MatchesReferenceAndSingleRankBitwise) {
  const Case& c = GetParam();
  const int P = world_size(), me = world_rank();
  if (c.dtype != DType::f32 && !detail::kernel_supports(c.dtype))
    GTEST_SKIP() << "kernel " << kernel_name() << " does not support " << dtype_name(c.dtype);
  std::vector<std::int64_t> q_lens, kv_lens;
  make_lengths(c, P, q_lens, kv_lens);
  AttentionShape shape;
  shape.q_heads = c.hq;
  shape.kv_heads = c.hkv == c.hq && c.seed % 2 == 0 ? 0 : c.hkv;  // 0 means MHA: exercise both
  shape.head_dim = c.dim;
  shape.causal = c.causal;
  shape.return_lse = c.lse;
  shape.scale = c.scale;
  shape.dtype = c.dtype;
  const Problem pb = make_problem(shape, q_lens, kv_lens, c.seed);
  SCOPED_TRACE(pb.str());
  const Layouts layouts = layouts_of(c.mix);

  // Collective part: every rank runs all of it; failures are only recorded here.
  auto world = make_mpi_communicator(MPI_COMM_WORLD);
  auto self = make_mpi_communicator(MPI_COMM_SELF);
  RunResult dist, whole;
  const Outcome run = capture([&] {
    const Plan plan = c.create ? Plan::create(*world, shape, q_lens[me], kv_lens[me])
                               : Plan::from_lengths(*world, shape, q_lens, kv_lens);
    Workspace ws;
    dist = run_shard(plan, pb, layouts, ws);
  });
  // The single-rank run uses another thread count: the result may not depend on it either.
  const Outcome alone = capture([&] {
    set_num_threads(3);
    Workspace ws;
    whole = run_whole(*self, pb, ws);
  });
  set_num_threads(0);
  EXPECT_EQ(run.kind, Outcome::ok) << "rank " << me << " distributed run " << run.str();
  EXPECT_EQ(alone.kind, Outcome::ok) << "rank " << me << " single-rank run " << alone.str();
  const bool ran = run.kind == Outcome::ok && alone.kind == Outcome::ok;

  const std::int64_t first = pb.q_first(me), n = q_lens[me], row = c.hq * c.dim;
  std::vector<double> ref, ref_lse;
  std::vector<float> plain, plain_lse;
  reference_rows(pb, first, n, ref, ref_lse);
  plain_fp32_rows(pb, first, n, plain, plain_lse);

  // Tolerance. The library must be at most 2x as far from the float64 reference as a textbook fp32
  // implementation (sequential sums, two-pass softmax) on the same inputs, maximized over the whole
  // problem, plus the roundings the output type forces. Every output is a convex combination of v
  // rows with |v| < 1. f32: 2^-23, two half-ulps of final rounding that the plain implementation may
  // happen to avoid. bf16 (inputs are bf16 values, so the reference sees what the kernel sees):
  // 2^-7, two bf16 half-ulps (2^-8 relative each): the stored output, and the attention weights,
  // which a bf16 kernel may round to bf16 for the P·V product (a relative weight error of 2^-8
  // moves a convex combination of |v| < 1 by at most 2^-8). lse is f32 in both cases and gets the
  // f32 rule at its own magnitude.
  const double err = allreduce_max(ran ? max_abs_diff(dist.out, ref) : INFINITY);
  const double plain_err = allreduce_max(max_abs_diff(plain, ref));
  const double tol = 2 * plain_err + std::ldexp(1.0, c.dtype == DType::bf16 ? -7 : -23);
  double lse_mag = 1;
  for (double x : ref_lse)
    if (std::isfinite(x)) lse_mag = std::max(lse_mag, std::fabs(x));
  lse_mag = allreduce_max(lse_mag);
  const double lse_err = allreduce_max(ran && c.lse ? max_lse_diff(dist.lse, ref_lse) : 0.0);
  const double plain_lse_err = allreduce_max(max_lse_diff(plain_lse, ref_lse));
  const double lse_tol = 2 * plain_lse_err + std::ldexp(lse_mag, -23);
  // UAA_TEST_VERBOSE=1 prints how close the library is to the plain fp32 yardstick.
  if (me == 0 && std::getenv("UAA_TEST_VERBOSE"))
    std::printf("[ accuracy ] err %.3g plain %.3g ratio %.2f | lse err %.3g plain %.3g\n", err,
                plain_err, plain_err > 0 ? err / plain_err : 0.0, lse_err, plain_lse_err);
  if (me == 0) {
    EXPECT_LE(err, tol) << "output error " << err << " vs plain fp32 " << plain_err;
    if (c.lse) {
      EXPECT_LE(lse_err, lse_tol) << "lse error " << lse_err << " vs plain fp32 " << plain_lse_err;
    }
  }
  if (!ran) return;

  // Exactness: my slice of the one-rank run, bit for bit.
  ASSERT_EQ(static_cast<std::int64_t>(dist.out.size()), n * row);
  ASSERT_EQ(static_cast<std::int64_t>(whole.out.size()), pb.q_total() * row);
  EXPECT_TRUE(bitwise_equal(dist.out.data(), whole.out.data() + first * row, n * row))
      << "rank " << me << ": output differs from the single-rank run (max diff "
      << max_abs_diff(dist.out, std::vector<float>(whole.out.begin() + first * row,
                                                   whole.out.begin() + (first + n) * row))
      << ")";
  if (c.lse) {
    ASSERT_EQ(static_cast<std::int64_t>(dist.lse.size()), n * c.hq);
    EXPECT_TRUE(bitwise_equal(dist.lse.data(), whole.lse.data() + first * c.hq, n * c.hq))
        << "rank " << me << ": lse differs from the single-rank run";
  }
  EXPECT_TRUE(dist.out_gaps_intact) << "rank " << me << ": forward wrote outside the output rows";
  EXPECT_TRUE(dist.lse_gaps_intact) << "rank " << me << ": forward wrote outside the lse entries";

  // Rows that may attend no key: zeros and -inf, exactly.
  std::int64_t blind = 0, wrong = 0;
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t h = 0; h < c.hq; ++h) {
      if (!std::isinf(ref_lse[i * c.hq + h])) continue;
      ++blind;
      bool ok = !c.lse || dist.lse[i * c.hq + h] == -INFINITY;
      for (std::int64_t d = 0; d < c.dim; ++d) ok = ok && dist.out[(i * c.hq + h) * c.dim + d] == 0.0f;
      wrong += !ok;
    }
  }
  EXPECT_EQ(wrong, 0) << "rank " << me << ": of " << blind
                      << " (row, head) pairs that see no key, these are not zeros / -inf";
}

// Heads 1, 2, 3, 7, 24, 30, 40 (with 8 ranks, more ranks than heads), GQA groups 1, 2, 4, 8, MQA;
// head dims 1 .. 128 incl. odd ones; masks, lse, cross lengths, layouts and plan kinds rotated.
const Case kCases[] = {
    // hq, hkv, dim, causal, lse, cross, mix, create, lens, max_len, seed
    {1, 1, 1, false, false, Cross::self, Mix::contiguous, true, Lens::random, 69, 1},
    {1, 1, 8, true, true, Cross::self, Mix::head_major, false, Lens::random, 69, 2},
    {1, 1, 64, true, false, Cross::kv_longer, Mix::padded, true, Lens::random, 51, 3},
    {2, 2, 8, false, true, Cross::kv_shorter, Mix::mixed, false, Lens::random, 51, 4},
    {2, 1, 100, true, true, Cross::self, Mix::contiguous, true, Lens::random, 39, 5},
    {3, 3, 7, true, false, Cross::self, Mix::padded, false, Lens::random, 57, 6},
    {3, 1, 33, false, true, Cross::kv_longer, Mix::head_major, true, Lens::random, 39, 7},
    {3, 3, 100, true, true, Cross::kv_shorter, Mix::mixed, true, Lens::random, 33, 8},
    {7, 7, 1, true, true, Cross::kv_shorter, Mix::contiguous, false, Lens::random, 51, 9},
    {7, 1, 8, false, false, Cross::self, Mix::mixed, true, Lens::random, 39, 10},
    {7, 7, 64, true, false, Cross::kv_longer, Mix::head_major, false, Lens::random, 33, 11},
    {24, 24, 64, true, true, Cross::self, Mix::contiguous, true, Lens::random, 27, 12},
    {24, 12, 8, false, true, Cross::kv_longer, Mix::padded, false, Lens::random, 33, 13},
    {24, 6, 16, true, false, Cross::self, Mix::head_major, true, Lens::random, 33, 14},
    {24, 3, 5, true, true, Cross::kv_shorter, Mix::mixed, false, Lens::random, 33, 15},
    {24, 1, 100, false, false, Cross::self, Mix::contiguous, true, Lens::random, 21, 16},
    {30, 30, 8, true, true, Cross::self, Mix::padded, true, Lens::random, 27, 17},
    {30, 15, 16, false, false, Cross::kv_shorter, Mix::contiguous, false, Lens::random, 27, 18},
    {30, 1, 3, true, false, Cross::kv_longer, Mix::mixed, true, Lens::random, 33, 19},
    {40, 40, 16, false, true, Cross::self, Mix::head_major, false, Lens::random, 21, 20},
    {40, 20, 8, true, false, Cross::self, Mix::contiguous, true, Lens::random, 27, 21},
    {40, 10, 64, true, true, Cross::kv_longer, Mix::padded, true, Lens::random, 21, 22},
    {40, 5, 9, false, true, Cross::kv_shorter, Mix::mixed, false, Lens::random, 27, 23},
    {40, 1, 128, true, false, Cross::self, Mix::contiguous, false, Lens::random, 15, 24},
    {32, 4, 64, true, true, Cross::self, Mix::mixed, true, Lens::random, 27, 25},  // Llama-like GQA 8
    {8, 1, 256, true, true, Cross::kv_longer, Mix::contiguous, true, Lens::random, 21, 26},
    // Edge lengths.
    {3, 1, 8, false, true, Cross::self, Mix::contiguous, true, Lens::kv_empty, 27, 30},
    {3, 1, 8, true, true, Cross::self, Mix::mixed, false, Lens::kv_empty, 27, 31},
    {5, 5, 4, true, true, Cross::kv_longer, Mix::padded, true, Lens::q_empty, 27, 32},
    {4, 2, 4, true, true, Cross::self, Mix::head_major, true, Lens::all_empty, 27, 33},
    {6, 3, 12, true, true, Cross::self, Mix::mixed, false, Lens::one_rank, 111, 34},
    {6, 2, 12, false, true, Cross::kv_longer, Mix::padded, true, Lens::one_rank, 69, 35},
    {2, 2, 8, true, true, Cross::self, Mix::contiguous, true, Lens::single_token, 27, 36},
    {9, 3, 8, true, true, Cross::kv_longer, Mix::head_major, false, Lens::single_token, 27, 37},
    {9, 3, 8, true, true, Cross::kv_shorter, Mix::mixed, true, Lens::random, 111, 38},
    // Longer sequences: keys span several 64-key tiles of the kernel.
    {2, 1, 16, true, true, Cross::self, Mix::mixed, true, Lens::random, 150, 40},
    {3, 3, 8, false, false, Cross::kv_longer, Mix::padded, false, Lens::random, 150, 41},
    // Heads that do not divide by the ranks over enough rows that ranks share a head's rows
    // (cuts at multiples of 48 rows; see RowSplitIsExercised below).
    {1, 1, 32, true, true, Cross::self, Mix::mixed, true, Lens::random, 300, 42},
    {3, 1, 16, true, false, Cross::kv_shorter, Mix::head_major, false, Lens::random, 300, 43},
    {5, 5, 8, false, true, Cross::kv_longer, Mix::padded, true, Lens::random, 300, 44},
    {30, 15, 8, true, true, Cross::self, Mix::contiguous, false, Lens::random, 200, 45},
    {3, 3, 64, true, true, Cross::self, Mix::contiguous, true, Lens::random, 300, 64, 0, DType::bf16},
    // A caller-chosen scale (large, to stress the softmax range) and a negative one.
    {4, 2, 16, true, true, Cross::self, Mix::contiguous, true, Lens::random, 69, 50, 2.5f},
    {4, 4, 16, false, true, Cross::kv_longer, Mix::mixed, false, Lens::random, 69, 51, -0.7f},
    // bf16 storage (skipped where the kernel has no bf16 path).
    {6, 2, 64, true, true, Cross::self, Mix::contiguous, true, Lens::random, 69, 60, 0, DType::bf16},
    {5, 5, 9, false, true, Cross::kv_longer, Mix::mixed, false, Lens::random, 57, 61, 0, DType::bf16},
    {24, 3, 128, true, false, Cross::kv_shorter, Mix::padded, true, Lens::random, 27, 62, 0, DType::bf16},
    {2, 1, 33, true, true, Cross::self, Mix::head_major, false, Lens::random, 90, 63, 0, DType::bf16},
};

INSTANTIATE_TEST_SUITE_P(Shapes, ForwardCase, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return case_name(info.param);
                         });

// ---- Workspace reuse ------------------------------------------------------------------------------

Problem reuse_problem(int P, std::uint64_t seed, std::int64_t max_len, bool lse) {
  Case c{6, 2, 24, true, lse, Cross::kv_longer, Mix::mixed, true, Lens::random, max_len, seed};
  std::vector<std::int64_t> q, kv;
  make_lengths(c, P, q, kv);
  AttentionShape s;
  s.q_heads = 6;
  s.kv_heads = 2;
  s.head_dim = 24;
  s.causal = true;
  s.return_lse = lse;
  return make_problem(s, q, kv, seed);
}

// The cases above share heads between ranks; make sure the split really happens at this world size.
TEST(Forward, RowSplitIsExercised) {
  const int P = world_size();
  if (P < 2) GTEST_SKIP() << "one rank computes everything";
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  AttentionShape s;
  s.q_heads = 1;
  s.head_dim = 8;
  const std::vector<std::int64_t> lens(P, 150);
  const Plan plan = Plan::from_lengths(*comm, s, lens, lens);
  for (int r = 0; r + 1 < P; ++r) {
    EXPECT_EQ(plan.work(r).end_head, 0) << "rank " << r;
    EXPECT_GT(plan.work(r).end_row, 0) << "rank " << r;
    EXPECT_EQ(plan.work(r).end_row % 48, 0) << "rank " << r;
  }
}

TEST(Workspace, LaterCallsWithTheSamePlanAllocateNothingAndRepeatExactly) {
  const int P = world_size(), me = world_rank();
  const Problem pb = reuse_problem(P, 77, 21, true);
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  Workspace ws;
  std::vector<RunResult> results;
  std::vector<std::int64_t> grows, bytes;
  const Outcome o = capture([&] {
    const Plan plan = Plan::create(*comm, pb.shape, pb.q_lens[me], pb.kv_lens[me]);
    for (int call = 0; call < 3; ++call) {
      results.push_back(run_shard(plan, pb, layouts_of(Mix::mixed), ws));
      grows.push_back(ws.grow_count());
      bytes.push_back(ws.bytes_reserved());
    }
    // Other layouts of the same inputs: the workspace depends on the plan only.
    results.push_back(run_shard(plan, pb, layouts_of(Mix::contiguous), ws));
    grows.push_back(ws.grow_count());
    bytes.push_back(ws.bytes_reserved());
  });
  expect_ok_everywhere(o);
  if (o.kind != Outcome::ok) return;
  ASSERT_EQ(results.size(), 4u);
  EXPECT_EQ(grows[0] > 0, bytes[0] > 0) << "rank " << me;
  for (int call = 1; call < 4; ++call) {
    EXPECT_EQ(grows[call], grows[0]) << "rank " << me << " call " << call << " allocated";
    EXPECT_EQ(bytes[call], bytes[0]) << "rank " << me << " call " << call;
    EXPECT_TRUE(bitwise_equal(results[call].out.data(), results[0].out.data(), results[0].out.size()))
        << "rank " << me << " call " << call << " differs from call 0";
    EXPECT_EQ(results[call].lse.size(), results[0].lse.size());
    EXPECT_TRUE(bitwise_equal(results[call].lse.data(), results[0].lse.data(),
                              std::min(results[call].lse.size(), results[0].lse.size())))
        << "rank " << me << " call " << call << " lse differs";
  }
}

TEST(Workspace, SmallerPlanReusesBuffersLargerPlanGrows) {
  const int P = world_size(), me = world_rank();
  const Problem big = reuse_problem(P, 91, 29, true);
  // Same shape, every rank's lengths at most those of `big`, so every buffer fits.
  std::vector<std::int64_t> q_small(big.q_lens), kv_small(big.kv_lens);
  for (auto& x : q_small) x /= 2;
  for (auto& x : kv_small) x /= 2;
  const Problem small = make_problem(big.shape, q_small, kv_small, 92);
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  Workspace ws;
  std::int64_t after_big = -1, after_small = -1;
  RunResult small_shared, small_fresh;
  const Outcome o = capture([&] {
    const Plan pbig = Plan::from_lengths(*comm, big.shape, big.q_lens, big.kv_lens);
    const Plan psmall = Plan::from_lengths(*comm, small.shape, small.q_lens, small.kv_lens);
    run_shard(pbig, big, Layouts{}, ws);
    after_big = ws.grow_count();
    small_shared = run_shard(psmall, small, Layouts{}, ws);
    after_small = ws.grow_count();
    Workspace fresh;
    small_fresh = run_shard(psmall, small, Layouts{}, fresh);
  });
  expect_ok_everywhere(o);
  if (o.kind != Outcome::ok) return;
  EXPECT_EQ(after_small, after_big) << "rank " << me << ": a smaller plan made the workspace grow";
  EXPECT_TRUE(bitwise_equal(small_shared.out.data(), small_fresh.out.data(), small_fresh.out.size()));
  EXPECT_EQ(small_shared.out.size(), small_fresh.out.size());
}

// Several plans (layers with different layouts) interleaved on one communicator, as a model calls
// them: every call is still exact.
TEST(Forward, InterleavedPlansOnOneCommunicator) {
  const int P = world_size(), me = world_rank();
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  auto self = make_mpi_communicator(MPI_COMM_SELF);
  const Problem a = reuse_problem(P, 101, 13, false);
  const Problem b = reuse_problem(P, 102, 19, true);
  std::vector<RunResult> got, want(2);
  const Outcome o = capture([&] {
    const Plan pa = Plan::create(*comm, a.shape, a.q_lens[me], a.kv_lens[me]);
    const Plan pb = Plan::from_lengths(*comm, b.shape, b.q_lens, b.kv_lens);
    Workspace ws;
    for (int step = 0; step < 3; ++step) {
      got.push_back(run_shard(pa, a, layouts_of(Mix::padded), ws));
      got.push_back(run_shard(pb, b, layouts_of(Mix::head_major), ws));
    }
  });
  const Outcome alone = capture([&] {
    Workspace ws;
    want[0] = run_whole(*self, a, ws);
    want[1] = run_whole(*self, b, ws);
  });
  expect_ok_everywhere(o);
  EXPECT_EQ(alone.kind, Outcome::ok) << alone.str();
  if (o.kind != Outcome::ok || alone.kind != Outcome::ok) return;
  ASSERT_EQ(got.size(), 6u);
  for (std::size_t i = 0; i < got.size(); ++i) {
    const Problem& pr = i % 2 == 0 ? a : b;
    const std::int64_t row = pr.hq() * pr.dim(), first = pr.q_first(me);
    const RunResult& w = want[i % 2];
    ASSERT_EQ(static_cast<std::int64_t>(got[i].out.size()), pr.q_lens[me] * row);
    EXPECT_TRUE(bitwise_equal(got[i].out.data(), w.out.data() + first * row, got[i].out.size()))
        << "rank " << me << " call " << i;
  }
}

TEST(Forward, ReportsPhaseTimes) {
  const int P = world_size(), me = world_rank();
  const Problem pb = reuse_problem(P, 111, 13, false);
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  PhaseTimes t;
  t.total = -1;
  const Outcome o = capture([&] {
    const Plan plan = Plan::create(*comm, pb.shape, pb.q_lens[me], pb.kv_lens[me]);
    CallBuffers c = make_call_buffers(pb, me, Layouts{}, false);
    Workspace ws;
    forward(plan, c.args(), ws, &t);
  });
  expect_ok_everywhere(o);
  if (me == 0) std::printf("[ kernel   ] %s\n", kernel_name());  // which kernel this run checked
  for (double x : {t.pack, t.exchange_qkv, t.attention, t.exchange_out, t.unpack}) {
    EXPECT_GE(x, 0.0);
    EXPECT_LE(x, t.total);
  }
}

}  // namespace
}  // namespace uaa::test
