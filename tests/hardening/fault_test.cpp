// Faults of the MPI transport (docs/FAILURE_MODEL.md): what every rank sees when one rank has a bad
// environment, stops participating, or hits an MPI error in the middle of an exchange.
//  - A local problem at construction (a malformed UAA_TIMEOUT_SECONDS or UAA_PEER_READS, NaN
//    timeout_seconds, a differing max_count) on one rank: every rank throws the same
//    invalid_argument within seconds (before: that rank threw alone and the others hung in
//    MPI_Comm_dup).
//  - timeout_seconds = 1e10 (or inf, or 0): no deadline, and it works (before: the 1e10 s deadline
//    overflowed and operations failed at once).
//  - A rank that stops participating before an agreement: every rank throws the same timeout,
//    naming the stopped rank, also ranks that waited for a healthy neighbour of it (before: they
//    blamed the neighbour), and the stopped rank itself when it comes back.
//  - An MPI error on one rank mid-exchange (MPI_ERR_TRUNCATE): that rank throws comm_failure, and
//    every other rank throws the same code and message promptly, far below the deadline (before:
//    the others waited out the deadline and reported a timeout). Every communicator is poisoned
//    afterwards.
//
// Rule of these tests: misbehaviour stays on a uaa communicator; ranks meet again on
// MPI_COMM_WORLD (a barrier) before the next test. No test waits on anything without a deadline.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "comm/control_plane.h"
#include "mpi/mpi_test_util.h"
#include "uaa/error.h"
#include "uaa/mpi.h"

namespace uaa::test {
namespace {

using Clock = std::chrono::steady_clock;

// What a call did, and how long it took.
struct Timed {
  Outcome outcome;
  double seconds = 0;
};

template <class F>
Timed timed(F&& f) {
  const Clock::time_point t0 = Clock::now();
  Timed t;
  t.outcome = capture(std::forward<F>(f));
  t.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return t;
}

// Sets an environment variable for the lifetime of the object (only where `here`).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value, bool here = true) : name_(name) {
    if (!here) return;
    active_ = true;
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (!active_) return;
    if (old_)
      setenv(name_, old_->c_str(), 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  bool active_ = false;
  std::optional<std::string> old_;
};

std::shared_ptr<Communicator> comm_with_deadline(double seconds) {
  MpiOptions o;
  o.timeout_seconds = seconds;
  return make_mpi_communicator(MPI_COMM_WORLD, o);
}

// Every later call on a poisoned communicator is refused with comm_failure, at once.
void expect_poisoned(Communicator& comm) {
  int x = 0;
  std::vector<int> all(static_cast<std::size_t>(comm.size()));
  const Timed g = timed([&] { comm.allgather(&x, sizeof x, all.data()); });
  EXPECT_EQ(g.outcome.code, ErrorCode::comm_failure) << g.outcome.str();
  EXPECT_NE(g.outcome.message.find("refused"), std::string::npos) << g.outcome.message;
  const Timed e = timed([&] { comm.exchange({}, {}); });
  EXPECT_EQ(e.outcome.code, ErrorCode::comm_failure) << e.outcome.str();
  const Timed a = timed([&] { detail::control_plane(comm).agree(detail::Vote{}); });
  EXPECT_EQ(a.outcome.code, ErrorCode::comm_failure) << a.outcome.str();
  EXPECT_LT(g.seconds + e.seconds + a.seconds, 0.5);
}

class Fault : public ::testing::Test {
 protected:
  void TearDown() override { MPI_Barrier(MPI_COMM_WORLD); }
};

// ---- (a), (b): a bad environment on one rank ----------------------------------------------------

void expect_construction_fails_everywhere(const char* variable, const char* value) {
  const int P = world_size(), me = world_rank(), bad = P - 1;
  Timed t;
  {
    ScopedEnv env(variable, value, me == bad);
    t = timed([&] { make_mpi_communicator(MPI_COMM_WORLD); });
  }
  expect_same_error_everywhere(t.outcome, ErrorCode::invalid_argument, bad,
                               {variable, std::string("'") + value + "'"});
  EXPECT_LT(t.seconds, 10.0) << "the ranks with a good environment waited";
}

TEST_F(Fault, MalformedTimeoutOnOneRankFailsEveryRank) {
  expect_construction_fails_everywhere("UAA_TIMEOUT_SECONDS", "abc");
}

TEST_F(Fault, MalformedPeerReadsOnOneRankFailsEveryRank) {
  expect_construction_fails_everywhere("UAA_PEER_READS", "maybe");
}

TEST_F(Fault, NanTimeoutOptionOnOneRankFailsEveryRank) {
  const int me = world_rank();
  MpiOptions o;
  if (me == 0) o.timeout_seconds = std::nan("");
  const Timed t = timed([&] { make_mpi_communicator(MPI_COMM_WORLD, o); });
  expect_same_error_everywhere(t.outcome, ErrorCode::invalid_argument, 0,
                               {"timeout_seconds is NaN"});
  EXPECT_LT(t.seconds, 10.0);
}

TEST_F(Fault, BadOrDifferingMaxCountFailsEveryRank) {
  const int P = world_size(), me = world_rank();
  MpiOptions zero;
  if (me == P - 1) zero.max_count = 0;
  const Timed t = timed([&] { make_mpi_communicator(MPI_COMM_WORLD, zero); });
  expect_same_error_everywhere(t.outcome, ErrorCode::invalid_argument, P - 1, {"max_count 0"});
  if (P < 2) return;
  MpiOptions other;
  if (me == P - 1) other.max_count = 1000;
  const Timed d = timed([&] { make_mpi_communicator(MPI_COMM_WORLD, other); });
  expect_same_error_everywhere(d.outcome, ErrorCode::invalid_argument, -1,
                               {"disagree on MpiOptions::max_count", "1000", "2147483647"});
}

// ---- (c): huge, infinite and zero timeouts mean no deadline -------------------------------------

TEST_F(Fault, HugeInfiniteAndZeroTimeoutsWork) {
  const int P = world_size(), me = world_rank();
  for (double s : {1e10, 1e300, std::numeric_limits<double>::infinity(), 0.0, -5.0}) {
    SCOPED_TRACE("timeout_seconds " + std::to_string(s));
    const Outcome o = capture([&] {
      auto comm = comm_with_deadline(s);
      const detail::Verdict v = detail::control_plane(*comm).agree(detail::Vote{});
      EXPECT_EQ(v.failed_count, 0);
      std::vector<int> all(static_cast<std::size_t>(P));
      comm->allgather(&me, sizeof me, all.data());
      for (int j = 0; j < P; ++j) EXPECT_EQ(all[static_cast<std::size_t>(j)], j);
      int out = me, in = -1;
      const Message snd{(me + 1) % P, &out, sizeof out}, rcv{(me + P - 1) % P, &in, sizeof in};
      comm->exchange(std::span<const Message>(&snd, 1), std::span<const Message>(&rcv, 1));
      EXPECT_EQ(in, (me + P - 1) % P);
    });
    expect_ok_everywhere(o);
  }
  ScopedEnv env("UAA_TIMEOUT_SECONDS", "1e10");
  const Outcome o = capture([&] {
    auto comm = make_mpi_communicator(MPI_COMM_WORLD);
    detail::control_plane(*comm).agree(detail::Vote{});
  });
  expect_ok_everywhere(o);
}

// ---- (d): a rank stops participating ------------------------------------------------------------

constexpr double kDeadline = 2.0;

// `stopped` does not join the agreement until every other rank has given up on it (a barrier on
// MPI_COMM_WORLD that the others enter after their agree() threw). Every rank must report the same
// timeout naming `stopped`: the ranks next to it from their own deadline, the others (which waited
// for a healthy rank) from its notice, and `stopped` itself, at once, when it comes back.
void stopped_rank(int stopped) {
  const int me = world_rank();
  auto comm = comm_with_deadline(kDeadline);
  detail::ControlPlane& cp = detail::control_plane(*comm);
  cp.agree(detail::Vote{});  // once together
  MPI_Barrier(MPI_COMM_WORLD);
  Timed t;
  if (me == stopped) {
    MPI_Barrier(MPI_COMM_WORLD);
    t = timed([&] { cp.agree(detail::Vote{}); });
  } else {
    t = timed([&] { cp.agree(detail::Vote{}); });
    MPI_Barrier(MPI_COMM_WORLD);
  }
  SCOPED_TRACE("rank " + std::to_string(stopped) + " stopped; this is rank " + std::to_string(me));
  expect_same_error_everywhere(t.outcome, ErrorCode::timeout, -1,
                               {"no data from rank(s) " + std::to_string(stopped), "agreement #1",
                                "timed out", "round"});
  if (me == stopped) {
    EXPECT_LT(t.seconds, 0.5) << "the stopped rank did not find the notice at once";
  } else {
    EXPECT_GE(t.seconds, kDeadline * 0.9) << t.outcome.message;
    EXPECT_LT(t.seconds, kDeadline + 3.0) << t.outcome.message;
  }
  expect_poisoned(*comm);
}

TEST_F(Fault, LastRankStops) {
  if (world_size() < 2) GTEST_SKIP() << "needs a rank that stops and one that waits";
  stopped_rank(world_size() - 1);
}

TEST_F(Fault, FirstRankStops) {
  if (world_size() < 2) GTEST_SKIP() << "needs a rank that stops and one that waits";
  stopped_rank(0);
}

TEST_F(Fault, MiddleRankStops) {
  if (world_size() < 3) GTEST_SKIP() << "needs three ranks";
  stopped_rank(1);
}

// ---- (e): an MPI error in the middle of an exchange ---------------------------------------------

// MPICH (4.0) raises errors of request completion (MPI_Test*, MPI_Wait*) on MPI_COMM_WORLD's error
// handler instead of the request's communicator's; with its default (fatal) handler the job aborts
// before uaa sees the error (uaa/mpi.h). Applications that want uaa::Error set MPI_ERRORS_RETURN on
// MPI_COMM_WORLD, as these tests do for their duration. (Open MPI uses the communicator's handler.)
class WorldErrorsReturn {
 public:
  WorldErrorsReturn() {
    MPI_Comm_get_errhandler(MPI_COMM_WORLD, &old_);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  ~WorldErrorsReturn() {
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, old_);
    MPI_Errhandler_free(&old_);
  }

 private:
  MPI_Errhandler old_ = MPI_ERRHANDLER_NULL;
};

// Rank 1 receives 32 bytes from rank 0, which sends 64 (MPI_ERR_TRUNCATE on rank 1); rank 0 and
// the others wait for data from rank 1 that never comes. The deadline is 4 s: everybody must be
// done in well under half of it.
TEST_F(Fault, MpiErrorMidExchangeReachesEveryRankPromptly) {
  const WorldErrorsReturn world_errors_return;
  const int P = world_size(), me = world_rank();
  if (P < 2) GTEST_SKIP() << "needs two ranks";
  constexpr double kLong = 4.0;
  auto comm = comm_with_deadline(kLong);
  detail::control_plane(*comm).agree(detail::Vote{});
  std::vector<char> out(64, 'x'), in(64, 0);
  std::vector<Message> sends, recvs;
  if (me == 0) {
    sends.push_back({1, out.data(), 64});
    recvs.push_back({1, in.data(), 16});
  } else if (me == 1) {
    recvs.push_back({0, in.data(), 32});  // too small
  } else {
    recvs.push_back({1, in.data(), 16});
  }
  MPI_Barrier(MPI_COMM_WORLD);
  const Timed t = timed([&] { comm->exchange(sends, recvs); });
  expect_same_error_everywhere(t.outcome, ErrorCode::comm_failure, 1,
                               {"receiving from rank 0", "exchange"});
  EXPECT_LT(t.seconds, kLong / 2) << "rank " << me << " was not told promptly";
  std::string lower = t.outcome.message;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  EXPECT_NE(lower.find("truncat"), std::string::npos) << t.outcome.message;
  expect_poisoned(*comm);
}

// The same error where the other ranks' exchange completes first: they get it at their next call.
TEST_F(Fault, MpiErrorReachesRanksAtTheirNextCall) {
  const WorldErrorsReturn world_errors_return;
  const int P = world_size(), me = world_rank();
  if (P < 2) GTEST_SKIP() << "needs two ranks";
  constexpr double kLong = 4.0;
  auto comm = comm_with_deadline(kLong);
  std::vector<char> out(64, 'x'), in(64, 0);
  std::vector<Message> sends, recvs;
  if (me == 0) sends.push_back({1, out.data(), 64});
  if (me == 1) recvs.push_back({0, in.data(), 32});
  MPI_Barrier(MPI_COMM_WORLD);
  const Timed t = timed([&] {
    comm->exchange(sends, recvs);
    detail::control_plane(*comm).agree(detail::Vote{});
  });
  expect_same_error_everywhere(t.outcome, ErrorCode::comm_failure, 1, {"receiving from rank 0"});
  EXPECT_LT(t.seconds, kLong / 2) << "rank " << me << " was not told promptly";
  expect_poisoned(*comm);
}

// A malformed exchange on one rank stops the collective: every rank is told at once (the ranks
// whose exchange completed without it: at their next call).
TEST_F(Fault, MalformedExchangeOnOneRankReachesEveryRank) {
  const int P = world_size(), me = world_rank();
  if (P < 2) GTEST_SKIP() << "needs two ranks";
  constexpr double kLong = 4.0;
  auto comm = comm_with_deadline(kLong);
  int out = me, in = -1;
  std::vector<Message> sends = {{(me + 1) % P, &out, sizeof out}};
  std::vector<Message> recvs = {{(me + P - 1) % P, &in, sizeof in}};
  if (me == P - 1) sends[0].bytes = -4;
  // Everybody is past construction (else the notice would surface in make_mpi_communicator on a
  // rank still finishing its last agreement: the same error, but no communicator to check after).
  MPI_Barrier(MPI_COMM_WORLD);
  const Timed t = timed([&] {
    comm->exchange(sends, recvs);
    detail::control_plane(*comm).agree(detail::Vote{});
  });
  expect_same_error_everywhere(t.outcome, ErrorCode::invalid_argument, P - 1,
                               {"exchange: send 0 of 1", "-4 bytes"});
  EXPECT_LT(t.seconds, kLong / 2) << "rank " << me << " was not told promptly";
  expect_poisoned(*comm);
}

// Healthy exchanges, self messages included, in listed order and of any split: the happy path of
// the same API, so that a failure above is not a broken exchange.
TEST_F(Fault, ExchangeMatchesMessagesInListedOrder) {
  const int P = world_size(), me = world_rank();
  auto comm = comm_with_deadline(30);
  // To every rank (itself included): three messages of 1, 4099 and 17 bytes, in that order.
  const std::int64_t sizes[3] = {1, 4099, 17};
  std::vector<std::vector<char>> out, in;
  std::vector<Message> sends, recvs;
  out.reserve(static_cast<std::size_t>(3 * P));
  in.reserve(static_cast<std::size_t>(3 * P));
  for (int j = 0; j < P; ++j)
    for (int k = 0; k < 3; ++k) {
      out.emplace_back(static_cast<std::size_t>(sizes[k]), static_cast<char>(me * 16 + k));
      in.emplace_back(static_cast<std::size_t>(sizes[k]), 0);
      sends.push_back({j, out.back().data(), sizes[k]});
      recvs.push_back({j, in.back().data(), sizes[k]});
    }
  const Outcome o = capture([&] { comm->exchange(sends, recvs); });
  expect_ok_everywhere(o);
  for (int j = 0; j < P; ++j)
    for (int k = 0; k < 3; ++k)
      for (char c : in[static_cast<std::size_t>(3 * j + k)])
        ASSERT_EQ(c, static_cast<char>(j * 16 + k)) << "from rank " << j << " message " << k;
}

}  // namespace
}  // namespace uaa::test
