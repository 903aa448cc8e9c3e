// Errors in collectives: whatever one rank (or every rank) gets wrong, every rank throws uaa::Error
// with the expected code and the same message naming the offending rank and values, nobody hangs,
// the caller's out/lse are untouched, and the communicator works for the next call.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "attention_harness.h"
#include "kernels/kernel.h"
#include "mpi_test_util.h"
#include "uaa/attention.h"
#include "uaa/error.h"
#include "uaa/mpi.h"
#include "uaa/plan.h"

namespace uaa::test {
namespace {

// A small valid problem; every rank has at least two query tokens (so overlapping output strides
// are detectable on every rank) and uneven kv lengths.
Problem small_problem(int P, bool lse, bool causal = true) {
  std::vector<std::int64_t> q(P), kv(P);
  for (int r = 0; r < P; ++r) {
    q[r] = 2 + r % 3;
    kv[r] = 3 + (2 * r) % 5;
  }
  AttentionShape s;
  s.q_heads = 6;
  s.kv_heads = 2;
  s.head_dim = 8;
  s.causal = causal;
  s.return_lse = lse;
  return make_problem(s, q, kv, 4242);
}

bool same_floats(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

// Collective. A correct call after an error must work and agree bit for bit with the single-rank run.
void expect_usable_after(Communicator& comm, const Problem& pb) {
  const int me = world_rank();
  auto self = make_mpi_communicator(MPI_COMM_SELF);
  RunResult got, want;
  const Outcome o = capture([&] {
    const Plan plan = Plan::create(comm, pb.shape, pb.q_lens[me], pb.kv_lens[me]);
    Workspace ws;
    got = run_shard(plan, pb, Layouts{}, ws);
  });
  const Outcome alone = capture([&] {
    Workspace ws;
    want = run_whole(*self, pb, ws);
  });
  SCOPED_TRACE("the correct call after the error");
  expect_ok_everywhere(o);
  if (o.kind != Outcome::ok || alone.kind != Outcome::ok) return;
  const std::int64_t row = pb.hq() * pb.dim(), first = pb.q_first(me);
  const std::vector<float> mine(want.out.begin() + first * row,
                                want.out.begin() + (first + pb.q_lens[me]) * row);
  EXPECT_TRUE(same_floats(got.out, mine)) << "rank " << me;
}

// ---- Plan::create ---------------------------------------------------------------------------------

struct CreateCall {
  AttentionShape shape;
  std::int64_t q_tokens, kv_tokens;
  PlanOptions options = {};
};

// Every rank calls Plan::create; `spoil` changes the arguments of the ranks for which `bad` holds.
void check_create_rejects(const std::function<bool(int)>& bad,
                          const std::function<void(CreateCall&)>& spoil, ErrorCode code,
                          int named_rank, const std::vector<std::string>& needles) {
  const int P = world_size(), me = world_rank();
  const Problem pb = small_problem(P, true);
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  CreateCall call{pb.shape, pb.q_lens[me], pb.kv_lens[me]};
  if (bad(me)) spoil(call);
  const Outcome o = capture(
      [&] { Plan::create(*comm, call.shape, call.q_tokens, call.kv_tokens, call.options); });
  expect_same_error_everywhere(o, code, named_rank, needles);
  expect_usable_after(*comm, pb);
}

int last_rank() { return world_size() - 1; }
auto only_last() {
  return [](int r) { return r == last_rank(); };
}
auto only(int rank) {
  return [rank](int r) { return r == rank; };
}
auto everyone() {
  return [](int) { return true; };
}

TEST(CreateErrors, NegativeQueryLengthOnOneRank) {
  check_create_rejects(only_last(), [](CreateCall& c) { c.q_tokens = -4; },
                       ErrorCode::invalid_argument, last_rank(), {"q_tokens -4"});
}

TEST(CreateErrors, NegativeKvLengthOnRankZero) {
  check_create_rejects(only(0), [](CreateCall& c) { c.kv_tokens = -1; }, ErrorCode::invalid_argument,
                       0, {"kv_tokens -1"});
}

TEST(CreateErrors, ZeroHeadsEverywhere) {
  check_create_rejects(everyone(), [](CreateCall& c) { c.shape.q_heads = c.shape.kv_heads = 0; },
                       ErrorCode::invalid_argument, 0, {"q_heads 0"});
}

TEST(CreateErrors, HeadDimZeroEverywhere) {
  check_create_rejects(everyone(), [](CreateCall& c) { c.shape.head_dim = 0; },
                       ErrorCode::invalid_argument, 0, {"head_dim 0"});
}

TEST(CreateErrors, HeadDim300OnOneRank) {
  check_create_rejects(only_last(), [](CreateCall& c) { c.shape.head_dim = 300; },
                       ErrorCode::invalid_argument, last_rank(), {"head_dim 300"});
}

TEST(CreateErrors, QueryHeadsNotAMultipleOfKvHeads) {
  check_create_rejects(everyone(), [](CreateCall& c) { c.shape.kv_heads = 4; },
                       ErrorCode::invalid_argument, 0, {"6", "4"});
}

// A binding (Python) that could not convert its own arguments on one rank: the other ranks get its
// problem too, before the values the binding left unset are looked at.
TEST(CreateErrors, BindingProblemOnOneRank) {
  check_create_rejects(only_last(), [](CreateCall& c) {
    c.options.caller_problem = "heads must be an integer, not str";
    c.shape.head_dim = 0;  // what a binding passes when it has nothing better
  }, ErrorCode::invalid_argument, last_rank(),
                       {"uaa::Plan::create: rank " + std::to_string(last_rank()) +
                        ": heads must be an integer, not str"});
}

// Ranks that disagree on the shape: only the last rank differs.
class CreateDisagreement : public ::testing::Test {
 protected:
  void SetUp() override {
    if (world_size() < 2) GTEST_SKIP() << "needs two ranks to disagree";
  }
};

TEST_F(CreateDisagreement, HeadDim) {
  check_create_rejects(only_last(), [](CreateCall& c) { c.shape.head_dim = 16; },
                       ErrorCode::mismatch, last_rank(), {"head_dim", "16", "8"});
}

TEST_F(CreateDisagreement, QueryHeads) {
  check_create_rejects(only_last(), [](CreateCall& c) { c.shape.q_heads = 12; },
                       ErrorCode::mismatch, last_rank(), {"q_heads", "12", "6"});
}

TEST_F(CreateDisagreement, KvHeads) {
  check_create_rejects(only_last(), [](CreateCall& c) { c.shape.kv_heads = 3; },
                       ErrorCode::mismatch, last_rank(), {"kv_heads", "3", "2"});
}

TEST_F(CreateDisagreement, Causal) {
  check_create_rejects(only_last(), [](CreateCall& c) { c.shape.causal = false; },
                       ErrorCode::mismatch, last_rank(), {"causal"});
}

TEST_F(CreateDisagreement, ReturnLse) {
  check_create_rejects(only_last(), [](CreateCall& c) { c.shape.return_lse = false; },
                       ErrorCode::mismatch, last_rank(), {"return_lse"});
}

TEST_F(CreateDisagreement, Scale) {
  check_create_rejects(only_last(), [](CreateCall& c) { c.shape.scale = 0.25f; },
                       ErrorCode::mismatch, last_rank(), {"scale", "0.25"});
}

// Where the kernel has no bf16 path the last rank's own check fails first (unsupported); where it
// has one this is a plain disagreement. Either way every rank raises the same error.
TEST_F(CreateDisagreement, Dtype) {
  const ErrorCode want =
      detail::kernel_supports(DType::bf16) ? ErrorCode::mismatch : ErrorCode::unsupported;
  check_create_rejects(only_last(), [](CreateCall& c) { c.shape.dtype = DType::bf16; }, want,
                       last_rank(), {"bf16"});
}

// ---- forward --------------------------------------------------------------------------------------

// One forward() call as a rank makes it; a spoil may change any part.
struct Call {
  const Plan* plan;
  AttentionArgs args;
  CallBuffers* bufs;
  float* spare_lse;  // a sentinel-filled [q_tokens][Hq] buffer for spoils that add an lse
};

struct ForwardSetup {
  bool lse = true;
  bool causal = true;
  std::function<bool(int)> bad = {};
  std::function<void(Call&)> spoil = {};
  ErrorCode code = ErrorCode::invalid_argument;
  int named_rank = 0;
  std::vector<std::string> needles = {};
  // Optional: plans built (on every rank, before the calls) for spoils that swap the plan.
  std::function<Plan(Communicator&, const Problem&)> other_plan = {};
  // The bad ranks call with other_plan: the error is "different plans", whose named rank and
  // needles follow from the two fingerprints (different_plans_error); named_rank and needles unused.
  bool different_plans = false;
};

// The error of ranks that call with different plans (src/core/agreement.cpp): it names the lowest
// rank that called with the larger plan fingerprint and quotes both fingerprints. Here the last rank
// alone calls with `odd`, every other rank with `common`; both plans are known on every rank.
struct PlansError {
  int named_rank;
  std::vector<std::string> needles;
};
PlansError different_plans_error(const Plan& common, const Plan& odd) {
  const std::uint64_t c = common.fingerprint(), o = odd.fingerprint();
  std::ostringstream hi, lo;
  hi << std::hex << std::max(c, o);
  lo << std::hex << std::min(c, o);
  return {o > c ? last_rank() : 0,
          {"ranks called with different plans", "has plan fingerprint " + hi.str(),
           "another rank " + lo.str()}};
}

// Every rank: a correct call, then a call spoiled on the `bad` ranks (all ranks must throw the same
// error and leave every caller buffer as it was), then a correct call again (same bits as the first).
void check_forward_rejects(const ForwardSetup& f) {
  const int P = world_size(), me = world_rank();
  const Problem pb = small_problem(P, f.lse, f.causal);
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  std::unique_ptr<Plan> plan, alt;
  Workspace ws;
  RunResult before, after;
  const Outcome setup = capture([&] {
    plan = std::make_unique<Plan>(Plan::create(*comm, pb.shape, pb.q_lens[me], pb.kv_lens[me]));
    if (f.other_plan) alt = std::make_unique<Plan>(f.other_plan(*comm, pb));
    before = run_shard(*plan, pb, Layouts{}, ws);
  });
  expect_ok_everywhere(setup);
  if (!allreduce_and(setup.kind == Outcome::ok)) return;  // every rank leaves together

  CallBuffers bufs = make_call_buffers(pb, me, Layouts{}, f.lse);
  std::vector<float> spare_lse(static_cast<std::size_t>(pb.q_lens[me] * pb.hq()), output_sentinel());
  Call call{plan.get(), bufs.args(), &bufs, spare_lse.data()};
  if (f.bad(me)) {
    if (f.other_plan) call.plan = alt.get();
    f.spoil(call);
  }
  const CallBuffers untouched = bufs;
  const std::vector<float> spare_before = spare_lse;
  const Outcome o = capture([&] { forward(*call.plan, call.args, ws); });
  if (f.different_plans) {
    const PlansError want = different_plans_error(*plan, *alt);
    expect_same_error_everywhere(o, f.code, want.named_rank, want.needles);
  } else {
    expect_same_error_everywhere(o, f.code, f.named_rank, f.needles);
  }
  EXPECT_TRUE(bufs.out.same_bits_as(untouched.out)) << "rank " << me << ": out was written";
  EXPECT_TRUE(same_floats(bufs.lse, untouched.lse)) << "rank " << me << ": lse was written";
  EXPECT_TRUE(same_floats(spare_lse, spare_before)) << "rank " << me << ": lse was written";
  EXPECT_TRUE(bufs.q.same_bits_as(untouched.q)) << "rank " << me << ": q was written";
  EXPECT_TRUE(bufs.k.same_bits_as(untouched.k)) << "rank " << me << ": k was written";
  EXPECT_TRUE(bufs.v.same_bits_as(untouched.v)) << "rank " << me << ": v was written";

  const Outcome again = capture([&] { after = run_shard(*plan, pb, Layouts{}, ws); });
  SCOPED_TRACE("the correct call after the error, same plan and workspace");
  expect_ok_everywhere(again);
  EXPECT_TRUE(same_floats(after.out, before.out)) << "rank " << me;
  EXPECT_TRUE(same_floats(after.lse, before.lse)) << "rank " << me;
  expect_usable_after(*comm, pb);
}

std::string num(std::int64_t v) { return std::to_string(v); }

TEST(ForwardErrors, WrongQueryTokensOnOneRank) {
  const int bad = last_rank();
  const std::int64_t have = small_problem(world_size(), true).q_lens[bad];
  check_forward_rejects({.bad = only(bad),
                         .spoil = [](Call& c) { c.args.q.tokens += 1; },
                         .named_rank = bad,
                         .needles = {"q.tokens " + num(have + 1), num(have)}});
}

TEST(ForwardErrors, BindingProblemOnOneRank) {
  const int bad = last_rank();
  check_forward_rejects({.bad = only(bad),
                         .spoil = [](Call& c) { c.args.caller_problem = "q is a list"; },
                         .named_rank = bad,
                         .needles = {"uaa::forward: rank " + num(bad) + ": q is a list"}});
}

TEST(ForwardErrors, WrongKvHeadsOnRankZero) {
  check_forward_rejects({.bad = only(0),
                         .spoil = [](Call& c) { c.args.k.heads = 3; },
                         .named_rank = 0,
                         .needles = {"k.heads 3", "2"}});
}

TEST(ForwardErrors, WrongOutputHeadsOnOneRank) {
  check_forward_rejects({.bad = only_last(),
                         .spoil = [](Call& c) { c.args.out.heads = 5; },
                         .named_rank = last_rank(),
                         .needles = {"out.heads 5", "6"}});
}

TEST(ForwardErrors, WrongDtypeOnOneRank) {
  check_forward_rejects({.bad = only_last(),
                         .spoil = [](Call& c) { c.args.v.dtype = DType::bf16; },
                         .named_rank = last_rank(),
                         .needles = {"v.dtype bf16", "f32"}});
}

TEST(ForwardErrors, NegativeStrideOnOneRank) {
  check_forward_rejects({.bad = only_last(),
                         .spoil = [](Call& c) { c.args.q.token_stride = -48; },
                         .named_rank = last_rank(),
                         .needles = {"-48"}});
}

TEST(ForwardErrors, OverlappingOutputTokensOnOneRank) {
  // Token stride 8 with 6 heads of 8: token t+1's head 0 is token t's head 1.
  check_forward_rejects({.bad = only_last(),
                         .spoil = [](Call& c) { c.args.out.token_stride = 8; },
                         .named_rank = last_rank(),
                         .needles = {"out strides (8, 8)", "overlap"}});
}

TEST(ForwardErrors, OverlappingOutputHeadsOnRankZero) {
  check_forward_rejects({.bad = only(0),
                         .spoil = [](Call& c) { c.args.out.head_stride = 7; },
                         .named_rank = 0,
                         .needles = {"out strides (48, 7)", "overlap"}});
}

TEST(ForwardErrors, OutputOverlapsQueryOnOneRank) {
  check_forward_rejects({.bad = only_last(),
                         .spoil = [](Call& c) { c.args.out.data = c.bufs->q.data(); },
                         .named_rank = last_rank(),
                         .needles = {"out overlaps q"}});
}

TEST(ForwardErrors, OutputOverlapsValuesPartlyOnOneRank) {
  check_forward_rejects({.bad = only_last(),
                         // v starts inside out (not out inside v): out is larger than v with GQA,
                         // so out placed in v would also reach whatever the allocator put after v.
                         .spoil = [](Call& c) { c.args.v.data = static_cast<float*>(c.args.out.data) + 8; },
                         .named_rank = last_rank(),
                         .needles = {"out overlaps v"}});
}

TEST(ForwardErrors, LseGivenButPlanHasNoLse) {
  check_forward_rejects({.lse = false,
                         .bad = only_last(),
                         .spoil = [](Call& c) { c.args.lse = c.spare_lse; },
                         .named_rank = last_rank(),
                         .needles = {"lse", "return_lse"}});
}

TEST(ForwardErrors, LseMissingButPlanHasLse) {
  check_forward_rejects({.bad = only(0),
                         .spoil = [](Call& c) { c.args.lse = nullptr; },
                         .named_rank = 0,
                         .needles = {"lse is null"}});
}

TEST(ForwardErrors, EveryRankWrongReportsTheFirstAndCountsTheRest) {
  const int P = world_size();
  std::vector<std::string> needles = {"q.tokens"};
  if (P > 1) needles.push_back("(and " + num(P - 1) + " more rank(s)");
  check_forward_rejects({.bad = everyone(),
                         .spoil = [](Call& c) { c.args.q.tokens = 1000 + world_rank(); },
                         .named_rank = 0,
                         .needles = needles});
}

class PlanMismatch : public ::testing::Test {
 protected:
  void SetUp() override {
    if (world_size() < 2) GTEST_SKIP() << "needs two ranks to disagree";
  }
};

// Same lengths and counts, different `causal`: only the fingerprint tells.
TEST_F(PlanMismatch, SameCountsDifferentCausal) {
  check_forward_rejects({.bad = only_last(),
                         .spoil = [](Call&) {},
                         .code = ErrorCode::mismatch,
                         .other_plan = [](Communicator& comm, const Problem& pb) {
                           AttentionShape s = pb.shape;
                           s.causal = !s.causal;
                           return Plan::from_lengths(comm, s, pb.q_lens, pb.kv_lens);
                         },
                         .different_plans = true});
}

TEST_F(PlanMismatch, SameCountsDifferentScale) {
  check_forward_rejects({.bad = only_last(),
                         .spoil = [](Call&) {},
                         .code = ErrorCode::mismatch,
                         .other_plan = [](Communicator& comm, const Problem& pb) {
                           AttentionShape s = pb.shape;
                           s.scale = 0.125f;
                           return Plan::from_lengths(comm, s, pb.q_lens, pb.kv_lens);
                         },
                         .different_plans = true});
}

// Plan::from_lengths given different lengths on one rank, chosen so that the bytes this rank sends
// and receives still match: one query head of fewer than 48 rows is computed by rank 0 alone in
// both views (the split cuts at multiples of 48 rows), so the last rank sends its own rows and
// receives their output either way. The exchange would complete and the fingerprints must catch it.
// (Exchanged bytes are exact, so extra tokens no longer hide in alignment as they did with 6 heads.)
TEST_F(PlanMismatch, FromLengthsDifferentButCountCompatible) {
  const int P = world_size(), me = world_rank();
  AttentionShape s;
  s.q_heads = 1;
  s.kv_heads = 1;
  s.head_dim = 1;
  std::vector<std::int64_t> q(P, 1), kv(P);
  for (int r = 0; r < P; ++r) kv[r] = 2 + r % 3;
  std::vector<std::int64_t> q_odd = q;
  q_odd[0] = 2;  // the last rank believes rank 0 has 2 tokens
  const Problem pb = make_problem(s, q, kv, 7);
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  // Precondition of this test: the last rank's view changes none of the bytes it sends or receives.
  const Plan truth = Plan::from_lengths(*comm, s, q, kv);
  const Plan odd = Plan::from_lengths(*comm, s, q_odd, kv);
  const Plan& seen = me == P - 1 ? odd : truth;
  EXPECT_GT(truth.bytes_sent(), 0) << "rank " << me;  // every rank takes part in the exchange
  EXPECT_EQ(truth.bytes_sent(), seen.bytes_sent()) << "rank " << me;
  EXPECT_EQ(truth.bytes_received(), seen.bytes_received()) << "rank " << me;
  CallBuffers bufs = make_call_buffers(pb, me, Layouts{}, false);
  const CallBuffers untouched = bufs;
  Workspace ws;
  const Outcome o = capture([&] { forward(seen, bufs.args(), ws); });
  const PlansError want = different_plans_error(truth, odd);
  expect_same_error_everywhere(o, ErrorCode::mismatch, want.named_rank, want.needles);
  EXPECT_TRUE(bufs.out.same_bits_as(untouched.out)) << "rank " << me;
  const Problem usable = small_problem(P, false);
  expect_usable_after(*comm, usable);
}

// Lengths that disagree so much that the exchange counts differ (the last rank expects fewer bytes
// from rank 0 than rank 0 sends). Plan::from_lengths documents that the first forward() detects the
// disagreement; the error contract says every rank raises the same error and nobody hangs.
TEST_F(PlanMismatch, FromLengthsWithIncompatibleCounts) {
  const int P = world_size(), me = world_rank();
  const Problem pb = small_problem(P, false);
  std::vector<std::int64_t> q_seen = pb.q_lens;
  if (me == P - 1) q_seen[0] = 0;  // rank 0 really has 2 query tokens
  auto comm = make_mpi_communicator(MPI_COMM_WORLD);
  const Plan seen = Plan::from_lengths(*comm, pb.shape, q_seen, pb.kv_lens);
  CallBuffers bufs = make_call_buffers(pb, me, Layouts{}, false);
  const CallBuffers untouched = bufs;
  Workspace ws;
  const Outcome o = capture([&] { forward(seen, bufs.args(), ws); });
  expect_same_error_everywhere(o, ErrorCode::mismatch, -1, {});
  EXPECT_TRUE(bufs.out.same_bits_as(untouched.out)) << "rank " << me;
  expect_usable_after(*comm, pb);
}

}  // namespace
}  // namespace uaa::test
