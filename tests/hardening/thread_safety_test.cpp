// The documented concurrent use (docs/FAILURE_MODEL.md §7): forward() calls on *different*
// communicators, each with its own plans and workspace, run at the same time from different threads
// (MPI_THREAD_MULTIPLE); a Plan is read from several threads at once. Every concurrent result must be
// bitwise the result of the same call made alone.
#include <gtest/gtest.h>
#include <mpi.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "hardening/hardening_util.h"
#include "uaa/mpi.h"
#include "uaa/uaa.h"

namespace uaa::test {
namespace {

int g_thread_level = MPI_THREAD_SINGLE;

struct Lane {
  std::shared_ptr<Communicator> comm;
  AttentionShape shape;
  std::int64_t tokens = 0;
};

// Two lanes with different layouts, so that mixing their data could not go unnoticed.
std::vector<Lane> make_lanes(int rank) {
  std::vector<Lane> lanes(2);
  for (Lane& l : lanes) l.comm = make_mpi_communicator(MPI_COMM_WORLD);
  lanes[0].shape = {.q_heads = 6, .kv_heads = 2, .head_dim = 16, .causal = true};
  lanes[0].tokens = 40 + 7 * rank;
  lanes[1].shape = {.q_heads = 5, .kv_heads = 5, .head_dim = 24};
  lanes[1].tokens = 29 + 3 * rank;
  return lanes;
}

TEST(ThreadSafety, ConcurrentForwardOnDifferentCommunicatorsIsBitwiseTheSerialResult) {
  if (g_thread_level < MPI_THREAD_MULTIPLE) GTEST_SKIP() << "MPI lacks MPI_THREAD_MULTIPLE";
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  set_num_threads(1);  // two caller threads on a 2-core machine: no nested kernel threads
  std::vector<Lane> lanes = make_lanes(rank);
  std::vector<Plan> plans;
  for (Lane& l : lanes) plans.push_back(Plan::create(*l.comm, l.shape, l.tokens, l.tokens));

  // Serial results first.
  std::vector<std::vector<float>> expected;
  for (std::size_t i = 0; i < lanes.size(); ++i) {
    RankCall call(plans[i]);
    Workspace ws;
    forward(plans[i], call.args, ws);
    expected.push_back(call.out);
  }

  // Then both lanes at once, many calls each, every result checked.
  constexpr int kCalls = 30;
  std::atomic<int> mismatches{0}, errors{0};
  std::vector<std::thread> threads;
  for (std::size_t i = 0; i < lanes.size(); ++i)
    threads.emplace_back([&, i] {
      RankCall call(plans[i]);
      Workspace ws;
      for (int c = 0; c < kCalls; ++c) {
        std::fill(call.out.begin(), call.out.end(), -7.0f);
        try {
          forward(plans[i], call.args, ws);
        } catch (const Error&) {
          ++errors;
          return;
        }
        if (std::memcmp(call.out.data(), expected[i].data(), call.out.size() * sizeof(float)) != 0)
          ++mismatches;
      }
    });
  // Meanwhile this thread reads the shared plans.
  std::int64_t total = 0;
  for (int c = 0; c < 1000; ++c)
    for (const Plan& p : plans) total += p.q_total() + static_cast<std::int64_t>(p.describe().size());
  for (std::thread& t : threads) t.join();
  EXPECT_GT(total, 0);
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(ThreadSafety, APlanIsReadConcurrentlyWhileItsCommunicatorRunsCalls) {
  if (g_thread_level < MPI_THREAD_MULTIPLE) GTEST_SKIP() << "MPI lacks MPI_THREAD_MULTIPLE";
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::vector<Lane> lanes = make_lanes(rank);
  const Plan plan = Plan::create(*lanes[0].comm, lanes[0].shape, lanes[0].tokens, lanes[0].tokens);
  const std::string description = plan.describe();
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t)
    readers.emplace_back([&] {
      while (!stop.load()) {
        const Plan copy = plan;  // copies share the immutable data
        if (copy.describe() != description || copy.fingerprint() != plan.fingerprint()) ++bad;
      }
    });
  RankCall call(plan);
  Workspace ws;
  for (int c = 0; c < 10; ++c) forward(plan, call.args, ws);
  stop = true;
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(bad.load(), 0);
}

}  // namespace
}  // namespace uaa::test

int main(int argc, char** argv) {
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &uaa::test::g_thread_level);
  ::testing::InitGoogleTest(&argc, argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0, any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any_failed;
}
