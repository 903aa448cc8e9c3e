// Plan construction and validation without an MPI launch, over an in-process fake communicator.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "fake_communicator.h"
#include "kernels/kernel.h"
#include "plan/layout.h"
#include "plan/plan_data.h"
#include "program/program.h"
#include "uaa/error.h"
#include "uaa/plan.h"

namespace {

using uaa::AttentionShape;
using uaa::DType;
using uaa::ErrorCode;
using uaa::Plan;
using uaa::PlanOptions;
using uaa::Strategy;
using uaa::test::FakeCommunicator;
using Lens = std::vector<std::int64_t>;

// True if `text` contains `value` as a whole number (so 25 is not found inside 257 or -25).
bool names_number(const std::string& text, std::int64_t value) {
  const std::regex re("(^|[^0-9-])" + std::to_string(value) + "([^0-9]|$)");
  return std::regex_search(text, re);
}

// Runs `fn`, expects uaa::Error with `code` whose message names "rank <rank>" and every value.
void expect_error(const std::function<void()>& fn, ErrorCode code, int rank,
                  const std::vector<std::int64_t>& values) {
  try {
    fn();
  } catch (const uaa::Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(e.code(), code) << "got " << uaa::error_code_name(e.code()) << ": " << msg;
    EXPECT_NE(msg.find("rank " + std::to_string(rank)), std::string::npos)
        << "message does not name rank " << rank << ": " << msg;
    for (std::int64_t v : values)
      EXPECT_TRUE(names_number(msg, v)) << "message does not name " << v << ": " << msg;
    return;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected uaa::Error, got another exception: " << e.what();
    return;
  }
  ADD_FAILURE() << "expected uaa::Error " << uaa::error_code_name(code) << ", nothing thrown";
}

AttentionShape shape(std::int64_t hq, std::int64_t hkv, std::int64_t dim) {
  AttentionShape s;
  s.q_heads = hq;
  s.kv_heads = hkv;
  s.head_dim = dim;
  return s;
}

// Rank 3 of 4: a rank number that cannot be confused with the slot indices used below.
constexpr int kRank = 3, kRanks = 4;

class FromLengths : public ::testing::Test {
 protected:
  std::shared_ptr<FakeCommunicator> comm = std::make_shared<FakeCommunicator>(kRank, kRanks);
  Lens q{5, 0, 7, 11}, kv{3, 1, 0, 2};
  Plan make(const AttentionShape& s, const PlanOptions& o = {}) {
    return Plan::from_lengths(*comm, s, q, kv, o);
  }
};

TEST_F(FromLengths, ValidPlanDescribesEveryRankWithoutCommunicating) {
  AttentionShape s = shape(7, 0, 100);
  s.causal = true;
  s.return_lse = true;
  const Plan p = make(s);
  EXPECT_EQ(comm->allgathers, 0);
  EXPECT_EQ(comm->alltoallvs, 0);
  EXPECT_EQ(p.ranks(), kRanks);
  EXPECT_EQ(p.rank(), kRank);
  EXPECT_EQ(p.q_lens(), q);
  EXPECT_EQ(p.kv_lens(), kv);
  EXPECT_EQ(p.q_tokens(), 11);
  EXPECT_EQ(p.kv_tokens(), 2);
  EXPECT_EQ(p.q_total(), 23);
  EXPECT_EQ(p.kv_total(), 6);
  EXPECT_EQ(p.shape().kv_heads, 7);  // 0 means MHA
  EXPECT_EQ(p.shape().scale, 1.0f / std::sqrt(100.0f));
  EXPECT_TRUE(p.shape().causal);
  EXPECT_TRUE(p.shape().return_lse);
  const uaa::detail::PlanData& d = uaa::detail::plan_data(p);
  EXPECT_EQ(p.options().strategy, Strategy::uaa);
  EXPECT_FALSE(p.options().allow_mixed_kernels);
  EXPECT_EQ(&p.communicator(), comm.get());
  EXPECT_FALSE(d.failed);
  for (int r = 0; r < kRanks; ++r) {
    const uaa::detail::RankWork& w = d.work[r];
    const uaa::WorkRange range = p.work(r);
    EXPECT_EQ(range.first_head, w.first_head);
    EXPECT_EQ(range.first_row, w.first_row);
    EXPECT_EQ(range.end_head, w.end_head);
    EXPECT_EQ(range.end_row, w.end_row);
    EXPECT_EQ(p.q_head_begin(r), w.q_heads.begin);
    EXPECT_EQ(p.q_head_end(r), w.q_heads.end);
    EXPECT_EQ(p.kv_head_begin(r), w.kv_heads.begin);
    EXPECT_EQ(p.kv_head_end(r), w.kv_heads.end);
    if (r > 0) {  // ranges follow each other
      EXPECT_EQ(range.first_head, p.work(r - 1).end_head);
      EXPECT_EQ(range.first_row, p.work(r - 1).end_row);
    }
  }
  // The bytes are those of this rank's program: its parts to and from the other ranks.
  std::int64_t sent = 0, received = 0;
  for (const uaa::detail::ExchangeStep* x : {&d.forward.in, &d.forward.out}) {
    for (const uaa::detail::PeerParts& pp : x->send)
      for (std::uint32_t i = pp.begin; i < pp.end; ++i)
        if (pp.peer != kRank) sent += x->send_parts[i].bytes();
    for (const uaa::detail::PeerParts& pp : x->recv)
      for (std::uint32_t i = pp.begin; i < pp.end; ++i)
        if (pp.peer != kRank) received += x->recv_parts[i].bytes();
  }
  EXPECT_EQ(p.bytes_sent(), sent);
  EXPECT_EQ(p.bytes_received(), received);
  EXPECT_GT(sent, 0);
  EXPECT_GT(received, 0);
  EXPECT_EQ(p.staging_bytes(), d.forward.stage_in_bytes + d.forward.stage_out_bytes);
  EXPECT_GT(p.staging_bytes(), 0);
}

// Every strategy builds its own program; the split (work, heads) is uaa's for all of them.
TEST_F(FromLengths, StrategiesCompileTheirPrograms) {
  AttentionShape s = shape(8, 2, 16);
  s.return_lse = true;
  const Plan u = make(s);
  for (Strategy st : {Strategy::ulysses_pad, Strategy::allgather_kv}) {
    PlanOptions o;
    o.strategy = st;
    const Plan p = make(s, o);
    EXPECT_EQ(p.options().strategy, st);
    const uaa::detail::PlanData& d = uaa::detail::plan_data(p);
    for (int r = 0; r < kRanks; ++r) {
      EXPECT_EQ(p.q_head_begin(r), u.q_head_begin(r)) << uaa::strategy_name(st);
      EXPECT_EQ(p.work(r).end_row, u.work(r).end_row) << uaa::strategy_name(st);
    }
    EXPECT_EQ(p.bytes_sent(), d.forward.bytes_sent());
    EXPECT_NE(p.fingerprint(), u.fingerprint()) << uaa::strategy_name(st);
  }
  // ulysses_pad pads: it moves more than uaa; allgather_kv has no output exchange.
  PlanOptions o;
  o.strategy = Strategy::ulysses_pad;
  EXPECT_GT(make(s, o).bytes_sent(), u.bytes_sent());
  o.strategy = Strategy::allgather_kv;
  EXPECT_TRUE(uaa::detail::plan_data(make(s, o)).forward.out.send_parts.empty());
}

TEST_F(FromLengths, UlyssesNamesWhatDoesNotDivide) {
  PlanOptions o;
  o.strategy = Strategy::ulysses;
  auto message = [&](Lens q2, Lens kv2, std::int64_t heads) -> std::string {
    try {
      Plan::from_lengths(*comm, shape(heads, heads, 8), q2, kv2, o);
    } catch (const uaa::Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
      return e.what();
    }
    return "nothing thrown";
  };
  EXPECT_NE(message({4, 3, 4, 4}, {4, 3, 4, 4}, 4).find("15 tokens over 4 ranks"), std::string::npos);
  EXPECT_NE(message({5, 3, 4, 4}, {5, 3, 4, 4}, 4).find("rank 0 holds 5"), std::string::npos);
  EXPECT_NE(message({4, 4, 4, 4}, {4, 4, 4, 4}, 6).find("6 heads over 4 ranks"), std::string::npos);
  EXPECT_NE(message({4, 4, 4, 4}, {3, 2, 3, 4}, 4).find("key/value"), std::string::npos);
  // What ulysses accepts is plain Ulysses: no padding, and the bytes uaa sends to other ranks.
  const Lens even = {6, 6, 6, 6};
  const Plan pu = Plan::from_lengths(*comm, shape(8, 8, 16), even, even, o);
  const Plan uu = Plan::from_lengths(*comm, shape(8, 8, 16), even, even);
  EXPECT_EQ(pu.bytes_sent(), uu.bytes_sent());
  EXPECT_EQ(pu.bytes_received(), uu.bytes_received());
}

TEST_F(FromLengths, RejectsUnknownStrategyAndRanksOutOfRange) {
  PlanOptions o;
  o.strategy = static_cast<Strategy>(9);
  expect_error([&] { make(shape(4, 4, 8), o); }, ErrorCode::invalid_argument, kRank, {9});
  const Plan p = make(shape(4, 4, 8));
  for (int bad : {-1, kRanks}) {
    expect_error([&] { p.work(bad); }, ErrorCode::invalid_argument, bad, {bad, kRanks});
    expect_error([&] { p.q_head_begin(bad); }, ErrorCode::invalid_argument, bad, {bad});
    expect_error([&] { p.kv_head_end(bad); }, ErrorCode::invalid_argument, bad, {bad});
  }
}

TEST_F(FromLengths, AcceptsBoundaryShapes) {
  EXPECT_NO_THROW(make(shape(1, 1, 1)));
  EXPECT_NO_THROW(make(shape(40, 1, uaa::kMaxHeadDim)));  // MQA, largest head dim
  EXPECT_NO_THROW(make(shape(32, 4, 128)));               // GQA group 8
  AttentionShape s = shape(3, 3, 8);
  s.scale = -0.5f;  // any finite scale is allowed
  EXPECT_EQ(make(s).shape().scale, -0.5f);
  q = {0, 0, 0, 0};  // nothing at all is a valid layout
  kv = {0, 0, 0, 0};
  EXPECT_NO_THROW(make(shape(2, 2, 4)));
}

TEST_F(FromLengths, RejectsWrongVectorSizes) {
  const AttentionShape s = shape(4, 4, 8);
  expect_error([&] { Plan::from_lengths(*comm, s, {1, 2, 3}, {1, 2, 3, 4}); },
               ErrorCode::invalid_argument, kRank, {3, kRanks});
  expect_error([&] { Plan::from_lengths(*comm, s, {1, 2, 3, 4}, {1, 2, 3, 4, 5}); },
               ErrorCode::invalid_argument, kRank, {5, kRanks});
  expect_error([&] { Plan::from_lengths(*comm, s, {}, {}); }, ErrorCode::invalid_argument, kRank,
               {0, kRanks});
}

TEST_F(FromLengths, RejectsNegativeLengths) {
  const AttentionShape s = shape(4, 4, 8);
  expect_error([&] { Plan::from_lengths(*comm, s, {5, -5, 7, 11}, kv); },
               ErrorCode::invalid_argument, kRank, {-5});
  expect_error([&] { Plan::from_lengths(*comm, s, q, {3, 1, -1, 2}); },
               ErrorCode::invalid_argument, kRank, {-1});
  expect_error([&] { Plan::from_lengths(*comm, s, {5, 0, 7, -11}, kv); },
               ErrorCode::invalid_argument, kRank, {-11});
}

TEST_F(FromLengths, RejectsInvalidHeads) {
  expect_error([&] { make(shape(0, 0, 8)); }, ErrorCode::invalid_argument, kRank, {0});
  expect_error([&] { make(shape(-2, 1, 8)); }, ErrorCode::invalid_argument, kRank, {-2});
  expect_error([&] { make(shape(4, -1, 8)); }, ErrorCode::invalid_argument, kRank, {-1});
  expect_error([&] { make(shape(7, 2, 8)); }, ErrorCode::invalid_argument, kRank, {7, 2});
  expect_error([&] { make(shape(24, 5, 8)); }, ErrorCode::invalid_argument, kRank, {24, 5});
  expect_error([&] { make(shape(40, 3, 8)); }, ErrorCode::invalid_argument, kRank, {40, 3});
  expect_error([&] { make(shape(2, 4, 8)); }, ErrorCode::invalid_argument, kRank, {2, 4});
}

TEST_F(FromLengths, RejectsHeadDimOutOfRange) {
  // plan.h: head_dim is in [1, kMaxHeadDim]; a value outside is an invalid argument.
  for (std::int64_t d : {std::int64_t{0}, std::int64_t{-1}, uaa::kMaxHeadDim + 1, std::int64_t{300}})
    expect_error([&] { make(shape(4, 4, d)); }, ErrorCode::invalid_argument, kRank, {d});
}

TEST_F(FromLengths, RejectsNonFiniteScaleAndUnknownDtype) {
  AttentionShape s = shape(4, 4, 8);
  s.scale = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { make(s); }, ErrorCode::invalid_argument, kRank, {});
  s.scale = std::numeric_limits<float>::infinity();
  expect_error([&] { make(s); }, ErrorCode::invalid_argument, kRank, {});
  s = shape(4, 4, 8);
  s.dtype = static_cast<DType>(7);
  expect_error([&] { make(s); }, ErrorCode::invalid_argument, kRank, {7});
}

// Valid either way: if the kernel runs bf16 the plan is usable; if not, from_lengths (which cannot
// tell the other ranks) still returns the plan, marked failed with `unsupported`, for its first
// forward() to report on every rank.
TEST_F(FromLengths, Bf16IsBuiltOrMarkedUnsupported) {
  AttentionShape s = shape(4, 4, 8);
  s.dtype = DType::bf16;
  Plan p = make(shape(1, 1, 1));
  ASSERT_NO_THROW(p = make(s));
  const uaa::detail::PlanData& d = uaa::detail::plan_data(p);
  if (uaa::detail::kernel_supports(DType::bf16)) {
    EXPECT_FALSE(d.failed) << d.error_message;
  } else {
    EXPECT_TRUE(d.failed);
    EXPECT_EQ(d.error_code, ErrorCode::unsupported);
    EXPECT_NE(d.error_message.find("bf16"), std::string::npos) << d.error_message;
    EXPECT_NE(d.error_message.find("rank " + std::to_string(kRank)), std::string::npos) << d.error_message;
  }
}

TEST_F(FromLengths, FingerprintCoversEveryAgreedField) {
  const AttentionShape base = shape(8, 2, 16);
  const std::uint64_t f = make(base).fingerprint();
  EXPECT_EQ(make(base).fingerprint(), f) << "fingerprint is not deterministic";
  auto differs = [&](const char* what, Lens q2, Lens kv2, AttentionShape s2) {
    EXPECT_NE(Plan::from_lengths(*comm, s2, q2, kv2).fingerprint(), f) << what;
  };
  differs("q lengths permuted", {0, 5, 7, 11}, kv, base);
  differs("kv lengths permuted", q, {1, 3, 0, 2}, base);
  differs("q and kv swapped", {3, 1, 0, 2}, {5, 0, 7, 11}, base);
  differs("q_heads", q, kv, shape(4, 2, 16));
  differs("kv_heads", q, kv, shape(8, 4, 16));
  differs("head_dim", q, kv, shape(8, 2, 17));
  AttentionShape s = base;
  s.causal = true;
  differs("causal", q, kv, s);
  s = base;
  s.return_lse = true;
  differs("return_lse", q, kv, s);
  s = base;
  s.scale = 0.3f;
  differs("scale", q, kv, s);
  s = base;
  s.dtype = DType::bf16;
  differs("dtype", q, kv, s);
  for (Strategy st : {Strategy::ulysses_pad, Strategy::allgather_kv}) {
    PlanOptions o;
    o.strategy = st;
    EXPECT_NE(make(base, o).fingerprint(), f) << uaa::strategy_name(st);
  }
  PlanOptions mixed;
  mixed.allow_mixed_kernels = true;
  EXPECT_NE(make(base, mixed).fingerprint(), f) << "allow_mixed_kernels";
}

// Plan::create over a one-rank communicator: one all-gather, same validation as from_lengths.
TEST(PlanCreate, SingleRankBuildsWithOneAllgather) {
  auto comm = std::make_shared<FakeCommunicator>(0, 1);
  const Plan p = Plan::create(*comm, shape(30, 30, 128), 4481, 77);
  EXPECT_EQ(comm->allgathers, 1);
  EXPECT_EQ(p.q_lens(), Lens{4481});
  EXPECT_EQ(p.kv_lens(), Lens{77});
  EXPECT_EQ(p.q_head_begin(0), 0);
  EXPECT_EQ(p.q_head_end(0), 30);
  // The same layout built locally is the same plan.
  EXPECT_EQ(Plan::from_lengths(*comm, shape(30, 30, 128), {4481}, {77}).fingerprint(),
            p.fingerprint());
}

TEST(PlanCreate, SingleRankRejectsInvalidInput) {
  auto comm = std::make_shared<FakeCommunicator>(0, 1);
  expect_error([&] { Plan::create(*comm, shape(4, 4, 8), -3, 5); }, ErrorCode::invalid_argument, 0,
               {-3});
  expect_error([&] { Plan::create(*comm, shape(4, 4, 8), 3, -7); }, ErrorCode::invalid_argument, 0,
               {-7});
  expect_error([&] { Plan::create(*comm, shape(0, 0, 8), 3, 3); }, ErrorCode::invalid_argument, 0,
               {0});
  expect_error([&] { Plan::create(*comm, shape(6, 4, 8), 3, 3); }, ErrorCode::invalid_argument, 0,
               {6, 4});
  expect_error([&] { Plan::create(*comm, shape(4, 4, 0), 3, 3); }, ErrorCode::invalid_argument, 0,
               {0});
  expect_error([&] { Plan::create(*comm, shape(4, 4, 257), 3, 3); }, ErrorCode::invalid_argument,
               0, {257});
  AttentionShape s = shape(4, 4, 8);
  s.dtype = DType::bf16;
  if (uaa::detail::kernel_supports(DType::bf16)) {
    EXPECT_NO_THROW(Plan::create(*comm, s, 3, 3));
  } else {
    expect_error([&] { Plan::create(*comm, s, 3, 3); }, ErrorCode::unsupported, 0, {});
  }
}

}  // namespace
