// Deadlines (FAILURE_MODEL.md §1): a peer that never arrives becomes ErrorCode::timeout on the ranks
// that wait, within the deadline, naming the missing rank; the communicator then refuses further use.
// Without deadlines every test here hangs (ctest's TIMEOUT fails it): run with
// UAA_HARDENING_TIMEOUT=0 to see that.
//
// Rule of these tests: the rank that misbehaves does so on a uaa communicator only; everybody meets
// again on MPI_COMM_WORLD (a barrier) before the next test.
#include <gtest/gtest.h>
#include <mpi.h>

#include <optional>
#include <string>
#include <thread>

#include "hardening/hardening_util.h"
#include "uaa/error.h"
#include "uaa/mpi.h"

namespace uaa::test {
namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

std::shared_ptr<Communicator> comm_with_deadline(double seconds) {
  MpiOptions o;
  o.timeout_seconds = seconds;
  return make_mpi_communicator(MPI_COMM_WORLD, o);
}

struct Outcome {
  bool threw = false;
  ErrorCode code = ErrorCode::internal;
  std::string what;
  double seconds = 0;
};

template <class F>
Outcome timed(F&& f) {
  Outcome o;
  const auto t0 = SteadyClock::now();
  try {
    f();
  } catch (const Error& e) {
    o.threw = true;
    o.code = e.code();
    o.what = e.what();
  }
  o.seconds = seconds_since(t0);
  return o;
}

// What a waiting rank must see: a timeout, within the deadline plus slack, naming `missing`. (The
// first rank to time out tells the others with a failure notice, so a rank that entered the call a
// little later than that one stops a little before its own deadline: hence 0.9.)
void expect_timeout_naming(const Outcome& o, double deadline, int missing) {
  ASSERT_TRUE(o.threw) << "rank " << world_rank() << ": no error";
  EXPECT_EQ(o.code, ErrorCode::timeout) << o.what;
  EXPECT_GE(o.seconds, deadline * 0.9) << o.what;
  EXPECT_LT(o.seconds, deadline + 5.0) << o.what;
  EXPECT_NE(o.what.find("no data from rank(s) " + std::to_string(missing)), std::string::npos)
      << o.what;
  EXPECT_NE(o.what.find("timed out"), std::string::npos) << o.what;
  EXPECT_NE(o.what.find("unusable"), std::string::npos) << o.what;
}

// After a timeout the communicator refuses every operation with comm_failure.
void expect_poisoned(Communicator& comm, const Plan& plan) {
  RankCall call(plan);
  Workspace ws;
  const Outcome again = timed([&] { forward(plan, call.args, ws); });
  EXPECT_TRUE(again.threw);
  EXPECT_EQ(again.code, ErrorCode::comm_failure) << again.what;
  EXPECT_NE(again.what.find("unusable since an earlier operation failed"), std::string::npos)
      << again.what;
  EXPECT_LT(again.seconds, 1.0);
  char byte = 0, all[64];
  const Outcome gather = timed([&] { comm.allgather(&byte, 1, all); });
  EXPECT_EQ(gather.code, ErrorCode::comm_failure) << gather.what;
}

class Deadline : public ::testing::Test {
 protected:
  void SetUp() override {
    if (world_size() < 2) GTEST_SKIP() << "needs a peer that does not arrive";
  }
  void TearDown() override { MPI_Barrier(MPI_COMM_WORLD); }
};

// The last rank skips the second of three calls; the others time out on it and name it.
TEST_F(Deadline, RankSkipsACall) {
  const int P = world_size(), me = world_rank(), late = P - 1;
  const double deadline = test_deadline();
  auto comm = comm_with_deadline(deadline);
  const Plan plan = Plan::from_lengths(*comm, small_shape(), small_lens(P), small_lens(P));
  RankCall call(plan);
  Workspace ws;
  forward(plan, call.args, ws);  // call 0: everybody
  if (me == late) return;               // skips call 1 (TearDown meets the others)
  const Outcome o = timed([&] { forward(plan, call.args, ws); });
  expect_timeout_naming(o, deadline, late);
  expect_poisoned(*comm, plan);
}

// The last rank leaves its work early: destroys its communicator and plan and returns, while the
// others still call forward(). (A real process exit is tests/hardening/early_exit.cpp.)
TEST_F(Deadline, RankReturnsEarly) {
  const int P = world_size(), me = world_rank(), late = P - 1;
  const double deadline = test_deadline();
  auto comm = comm_with_deadline(deadline);
  std::optional<Plan> plan = Plan::create(*comm, small_shape(), small_lens(P)[me], small_lens(P)[me]);
  if (me == late) {
    plan.reset();
    comm.reset();
    return;
  }
  RankCall call(*plan);
  Workspace ws;
  const Outcome o = timed([&] { forward(*plan, call.args, ws); });
  expect_timeout_naming(o, deadline, late);
  expect_poisoned(*comm, *plan);
}

// The last rank calls with a plan of another communicator (same shape): its agreement goes where no
// peer listens. Both sides time out instead of waiting for each other forever.
TEST_F(Deadline, RankCallsWithAPlanOfAnotherCommunicator) {
  const int P = world_size(), me = world_rank(), late = P - 1;
  const double deadline = test_deadline();
  auto comm = comm_with_deadline(deadline);
  auto other = comm_with_deadline(deadline);
  const Plan plan = Plan::from_lengths(*comm, small_shape(), small_lens(P), small_lens(P));
  const Plan other_plan = Plan::from_lengths(*other, small_shape(), small_lens(P), small_lens(P));
  const Plan& mine = me == late ? other_plan : plan;
  RankCall call(mine);
  Workspace ws;
  const Outcome o = timed([&] { forward(mine, call.args, ws); });
  if (me == late) {
    ASSERT_TRUE(o.threw);
    EXPECT_EQ(o.code, ErrorCode::timeout) << o.what;
    EXPECT_NE(o.what.find("no data from rank(s) 0"), std::string::npos) << o.what;
  } else {
    expect_timeout_naming(o, deadline, late);
  }
}

// A peer that is merely slow (1 s late, deadline 2 s... or whatever the deadline is) is no error.
TEST_F(Deadline, SlowPeerWithinTheDeadlineIsFine) {
  const int P = world_size(), me = world_rank();
  const double deadline = test_deadline();
  auto comm = comm_with_deadline(deadline);
  const Plan plan = Plan::from_lengths(*comm, small_shape(), small_lens(P), small_lens(P));
  RankCall call(plan);
  Workspace ws;
  if (me == P - 1 && deadline > 0)
    std::this_thread::sleep_for(std::chrono::duration<double>(deadline * 0.4));
  const Outcome o = timed([&] { forward(plan, call.args, ws); });
  EXPECT_FALSE(o.threw) << o.what;
  const Outcome again = timed([&] { forward(plan, call.args, ws); });
  EXPECT_FALSE(again.threw) << again.what;
}

// The deadline comes from the option, else UAA_TIMEOUT_SECONDS; a malformed value is rejected.
TEST(DeadlineOptions, EnvironmentOverrideAndValidation) {
  const char* saved = std::getenv("UAA_TIMEOUT_SECONDS");
  const std::string keep = saved ? saved : "";
  setenv("UAA_TIMEOUT_SECONDS", "soon", 1);
  EXPECT_THROW(make_mpi_communicator(MPI_COMM_WORLD), Error);
  MpiOptions nan;
  nan.timeout_seconds = std::nan("");
  EXPECT_THROW(make_mpi_communicator(MPI_COMM_WORLD, nan), Error);
  MpiOptions explicit_option;
  explicit_option.timeout_seconds = 10;  // the option wins over the malformed environment
  EXPECT_NO_THROW(make_mpi_communicator(MPI_COMM_WORLD, explicit_option));
  setenv("UAA_TIMEOUT_SECONDS", "0", 1);  // wait forever
  EXPECT_NO_THROW(make_mpi_communicator(MPI_COMM_WORLD));
  if (saved)
    setenv("UAA_TIMEOUT_SECONDS", keep.c_str(), 1);
  else
    unsetenv("UAA_TIMEOUT_SECONDS");
}

}  // namespace
}  // namespace uaa::test
