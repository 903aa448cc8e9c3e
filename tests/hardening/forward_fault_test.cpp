// forward() under faults (docs/FAILURE_MODEL.md): a local problem on one rank (a bad
// UAA_NUM_THREADS, a workspace allocation that fails, a kernel that cannot run the dtype, another
// kernel variant, absurd strides) becomes the same uaa::Error on every rank, promptly (well inside
// the deadline), with the caller's out untouched and the communicator usable afterwards; copy
// failures of the peer-memory path reach every rank through the checkpoints; a rank that arrives
// after its peers gave up at the agreement throws instead of writing into memory they freed;
// changing the thread count while forward() runs cannot overrun the kernel's scratch.
//
// Some faults are per process and read once (UAA_NUM_THREADS, UAA_KERNEL): the CTest entries that
// need them run this binary with --last-rank-env=NAME=VALUE, which sets NAME on the last rank only,
// right after MPI_Init and before uaa reads anything, plus a --gtest_filter for the tests of that
// mode. Run without such an argument, the tests that need one skip.
//
// Rule of these tests: every rank makes every uaa collective call unconditionally (outcomes are
// captured and asserted afterwards); ranks meet again on MPI_COMM_WORLD before the next test.
#include <gtest/gtest.h>
#include <mpi.h>
#include <sys/resource.h>

#include <atomic>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "hardening/forward_fault_util.h"
#include "kernels/kernel.h"
#include "uaa/attention.h"
#include "uaa/error.h"
#include "uaa/mpi.h"
#include "uaa/plan.h"
#include "uaa/threads.h"

#if defined(__SANITIZE_ADDRESS__)
#define UAA_FAULT_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UAA_FAULT_TEST_ASAN 1
#endif
#endif
#ifndef UAA_FAULT_TEST_ASAN
#define UAA_FAULT_TEST_ASAN 0
#endif

namespace uaa::test {

// NAME=VALUE pairs set on the last rank by main() (--last-rank-env); identical on every rank.
std::vector<std::pair<std::string, std::string>> g_last_rank_env;

namespace {

constexpr double kDeadline = 3.0;  // the communicators' deadline in these tests
constexpr double kFast = 1.5;      // "promptly": well below the deadline

// The value --last-rank-env gave NAME, or null.
const char* last_rank_env(const char* name) {
  for (const auto& [n, v] : g_last_rank_env)
    if (n == name) return v.c_str();
  return nullptr;
}

AttentionShape small_shape(DType dtype = DType::f32) {
  AttentionShape s;
  s.q_heads = 6;
  s.kv_heads = 2;
  s.head_dim = 16;
  s.causal = true;
  s.dtype = dtype;
  return s;
}
std::vector<std::int64_t> small_q_lens(int P) {
  std::vector<std::int64_t> l(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) l[static_cast<std::size_t>(r)] = 5 + 3 * r;
  return l;
}
std::vector<std::int64_t> small_kv_lens(int P) {
  std::vector<std::int64_t> l(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) l[static_cast<std::size_t>(r)] = 4 + 2 * ((r + 1) % 3);
  return l;
}

// Collective: expect_same_error_everywhere, and with UAA_FAULT_TEST_VERBOSE set, rank 0 prints the
// agreed error (to read the messages).
void expect_agreed_error(const Outcome& o, ErrorCode code, int bad_rank,
                         const std::vector<std::string>& needles) {
  expect_same_error_everywhere(o, code, bad_rank, needles);
  if (world_rank() == 0 && std::getenv("UAA_FAULT_TEST_VERBOSE"))
    std::printf("[agreed] %s\n", o.str().c_str());
}

// Collective: every rank's out holds the sentinel.
void expect_out_untouched_everywhere(const Shard& sh) {
  const bool mine = sh.out_untouched();
  EXPECT_TRUE(mine) << "rank " << world_rank() << ": out was written by a call that failed";
  const bool all = allreduce_and(mine);
  if (world_rank() == 0) {
    EXPECT_TRUE(all) << "some rank's out was written (see its report)";
  }
}

// Collective: the call took less than kFast seconds on every rank.
void expect_prompt_everywhere(double seconds) {
  EXPECT_LT(seconds, kFast) << "rank " << world_rank() << " took " << seconds
                            << " s (deadline " << kDeadline << " s)";
  const double slowest = allreduce_max(seconds);
  if (world_rank() == 0) {
    EXPECT_LT(slowest, kFast) << "slowest rank: " << slowest << " s";
  }
}

// Collective: a correct call on `comm` (a small problem) works and matches the float64 reference.
void expect_usable(Communicator& comm, Workspace& ws) {
  const int P = world_size();
  std::optional<Plan> plan;
  std::vector<float> got;
  const Outcome o = capture([&] {
    plan.emplace(Plan::from_lengths(comm, small_shape(), small_q_lens(P), small_kv_lens(P)));
    Shard sh(*plan, 99);
    forward(*plan, sh.args, ws);
    got = sh.out;
  });
  SCOPED_TRACE("a correct call after the failure");
  expect_ok_everywhere(o);
  if (o.kind == Outcome::ok) {
    EXPECT_LT(max_error_vs_reference(*plan, 99, got), 1e-4);
  }
}

class ForwardFault : public ::testing::Test {
 protected:
  void SetUp() override {
    if (world_size() < 2) GTEST_SKIP() << "needs at least two ranks";
  }
  void TearDown() override { MPI_Barrier(MPI_COMM_WORLD); }
};

// 1. UAA_NUM_THREADS=abc on the last rank only (--last-rank-env=UAA_NUM_THREADS=abc).
// Before: forward() read the thread count only inside the kernel, after the q/k/v exchange: the
// last rank threw "UAA_NUM_THREADS=abc is not a positive integer" (no rank named) mid-call while
// its peers waited in the output exchange until their deadline (timeout): different errors, slow.
TEST_F(ForwardFault, BadThreadCountOnOneRankIsTheSameErrorEverywhere) {
  const char* value = last_rank_env("UAA_NUM_THREADS");
  if (!value) GTEST_SKIP() << "run with --last-rank-env=UAA_NUM_THREADS=abc";
  const int P = world_size(), me = world_rank(), bad = P - 1;
  auto comm = comm_with_deadline(kDeadline);
  const Plan plan = Plan::from_lengths(*comm, small_shape(), small_q_lens(P), small_kv_lens(P));
  Shard sh(plan, 1);
  Workspace ws;
  const Timed t = timed_capture([&] { forward(plan, sh.args, ws); });
  expect_agreed_error(t.outcome, ErrorCode::invalid_argument, bad,
                      {"UAA_NUM_THREADS", std::string("UAA_NUM_THREADS=") + value});
  expect_prompt_everywhere(t.seconds);
  expect_out_untouched_everywhere(sh);
  // set_num_threads() takes precedence over the environment: the last rank can go on.
  if (me == bad) set_num_threads(1);
  expect_usable(*comm, ws);
  if (me == bad) set_num_threads(0);
}

// Reads VmSize (bytes) of this process; -1 if unknown.
std::int64_t vm_size_bytes() {
  FILE* f = std::fopen("/proc/self/status", "r");
  if (!f) return -1;
  char line[256];
  std::int64_t kb = -1;
  while (std::fgets(line, sizeof line, f))
    if (std::strncmp(line, "VmSize:", 7) == 0) {
      kb = std::strtoll(line + 7, nullptr, 10);
      break;
    }
  std::fclose(f);
  return kb < 0 ? -1 : kb * 1024;
}

// 2. The last rank cannot allocate its workspace (RLIMIT_AS lowered to leave a quarter of its
// ~256 MB of staging; larger sizes only make the test slower: first touches of fresh memory ran at
// ~40 MB/s on the loaded development VM).
// Before: the workspace was reserved outside any check: std::bad_alloc escaped forward() on the
// last rank only, before the handshake, and its peers waited in the handshake until their deadline.
TEST_F(ForwardFault, WorkspaceAllocationFailureOnOneRankIsOutOfMemoryEverywhere) {
  if (UAA_FAULT_TEST_ASAN) GTEST_SKIP() << "RLIMIT_AS does not mix with AddressSanitizer";
  const int P = world_size(), me = world_rank(), bad = P - 1;
  // A longer deadline here: with 3 ranks the other ranks need staging of their own (~150 MB each),
  // which they allocate and touch before they vote (0.5 GB each took 12-16 s on the loaded
  // development VM), while the last rank, having failed at once, waits for them in the agreement.
  constexpr double kAllocDeadline = 30.0;
  const auto t_test = SteadyClock::now();
  auto comm = comm_with_deadline(kAllocDeadline);
  AttentionShape s;
  s.q_heads = 8;
  s.kv_heads = 8;
  s.head_dim = 128;
  // The other ranks hold many tokens, the last one few: it computes its share of the heads for
  // their tokens, so its staging (q/k/v rows in, output rows out) is ~256 MB.
  std::vector<std::int64_t> lens(static_cast<std::size_t>(P), (std::int64_t{1} << 16) / P);
  lens[static_cast<std::size_t>(bad)] = 48;
  const Plan plan = Plan::from_lengths(*comm, s, lens, lens);
  const std::int64_t n = plan.q_tokens() * s.q_heads * s.head_dim;
  // q, k, v: never read by a call that fails at its agreement, so left uninitialized (untouched
  // pages cost no memory). out: the sentinel, checked afterwards.
  std::unique_ptr<float[]> q(new float[static_cast<std::size_t>(n)]);
  std::unique_ptr<float[]> k(new float[static_cast<std::size_t>(n)]);
  std::unique_ptr<float[]> v(new float[static_cast<std::size_t>(n)]);
  std::vector<float> out(static_cast<std::size_t>(n));
  for (float& f : out) std::memcpy(&f, &kOutSentinel32, sizeof f);
  AttentionArgs args;
  args.q = contiguous(q.get(), plan.q_tokens(), s.q_heads, s.head_dim);
  args.k = contiguous(k.get(), plan.kv_tokens(), s.kv_heads, s.head_dim);
  args.v = contiguous(v.get(), plan.kv_tokens(), s.kv_heads, s.head_dim);
  args.out = contiguous(static_cast<void*>(out.data()), plan.q_tokens(), s.q_heads, s.head_dim);

  const std::int64_t staging = plan.staging_bytes();
  rlimit saved{};
  bool limited = false;
  std::int64_t limit = 0;
  if (me == bad && staging >= (std::int64_t{1} << 27)) {
    const std::int64_t vm = vm_size_bytes();
    if (vm > 0 && getrlimit(RLIMIT_AS, &saved) == 0) {
      rlimit lower = saved;
      limit = vm + staging / 4;
      lower.rlim_cur = static_cast<rlim_t>(limit);
      if (saved.rlim_cur == RLIM_INFINITY || lower.rlim_cur < saved.rlim_cur)
        limited = setrlimit(RLIMIT_AS, &lower) == 0;
    }
  }
  const bool ready = allreduce_and(me != bad || limited);
  if (me == bad) {
    EXPECT_TRUE(limited) << "could not lower RLIMIT_AS (staging " << staging << " bytes)";
  }
  if (!ready) return;  // every rank alike
  Workspace ws;
  const Timed t = timed_capture([&] { forward(plan, args, ws); });
  if (me == bad) {
    EXPECT_EQ(setrlimit(RLIMIT_AS, &saved), 0);
  }
  SCOPED_TRACE("this rank: staging " + std::to_string(staging) + " bytes, RLIMIT_AS " +
               std::to_string(limit) + (limited ? " (lowered)" : " (unchanged)"));
  expect_agreed_error(t.outcome, ErrorCode::out_of_memory, bad, {"could not allocate"});
  EXPECT_LT(t.seconds, kAllocDeadline / 2) << "rank " << me;
  if (std::getenv("UAA_FAULT_TEST_VERBOSE"))
    std::printf("[rank %d] forward %.3f s, test so far %.3f s\n", me, t.seconds,
                seconds_since(t_test));
  bool untouched = true;
  for (const float& f : out) {
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    untouched = untouched && u == kOutSentinel32;
  }
  EXPECT_TRUE(untouched) << "rank " << me << ": out was written by a call that failed";
  q.reset();
  k.reset();
  v.reset();
  out = {};
  expect_usable(*comm, ws);  // same communicator, same workspace, the limit restored
}

// The kernel name and bf16 support of every rank's kernel.
struct KernelInfo {
  std::vector<std::string> names;
  std::vector<bool> bf16;
};
KernelInfo kernel_info() {
  KernelInfo k;
  k.names = allgather_strings(kernel_name());
  const bool bf16 = detail::select_kernel().supports(DType::bf16);
  for (const std::string& s : allgather_strings(bf16 ? "1" : "0")) k.bf16.push_back(s == "1");
  return k;
}

// 3. Plan::from_lengths on a rank whose kernel cannot run the dtype (UAA_KERNEL=reference, bf16 on
// the last rank: --last-rank-env=UAA_KERNEL=reference).
// Before: from_lengths threw ErrorCode::unsupported on the last rank alone, which then never called
// forward(); its peers waited in forward()'s handshake until their deadline (timeout).
TEST_F(ForwardFault, KernelLackingTheDtypeOnOneRankIsUnsupportedEverywhere) {
  const int P = world_size(), me = world_rank(), bad = P - 1;
  const KernelInfo kernels = kernel_info();
  if (kernels.bf16[static_cast<std::size_t>(bad)])
    GTEST_SKIP() << "the last rank's kernel (" << kernels.names[static_cast<std::size_t>(bad)]
                 << ") runs bf16: run with --last-rank-env=UAA_KERNEL=reference";
  auto comm = comm_with_deadline(kDeadline);
  std::optional<Plan> plan;
  const Outcome made = capture([&] {
    plan.emplace(Plan::from_lengths(*comm, small_shape(DType::bf16), small_q_lens(P),
                                    small_kv_lens(P)));
  });
  {
    SCOPED_TRACE("Plan::from_lengths must not throw on the rank with the local problem");
    expect_ok_everywhere(made);
  }
  std::optional<Shard> sh;
  Workspace ws;
  Timed t;
  if (plan) {  // (a rank without a plan cannot call; its peers then time out)
    sh.emplace(*plan, 3);
    t = timed_capture([&] { forward(*plan, sh->args, ws); });
  }
  expect_agreed_error(t.outcome, ErrorCode::unsupported, bad,
                      {"bf16", kernels.names[static_cast<std::size_t>(bad)]});
  expect_prompt_everywhere(t.seconds);
  if (sh) {
    EXPECT_TRUE(sh->out_untouched()) << "rank " << me;
  }
}

// 4. Different kernel variants (--last-rank-env=UAA_KERNEL=flash_portable or =reference on the last
// rank): refused with ErrorCode::mismatch everywhere unless the plan allows mixed kernels, then
// correct within the kernels' tolerance.
// Before: nothing compared the ranks' kernels (and PlanOptions::allow_mixed_kernels did not exist):
// the call succeeded silently, no longer bitwise equal to a one-rank run.
TEST_F(ForwardFault, MixedKernelVariantsAreAMismatchUnlessAllowed) {
  const int P = world_size();
  const KernelInfo kernels = kernel_info();
  bool mixed = false;
  for (const std::string& n : kernels.names) mixed = mixed || n != kernels.names[0];
  if (!mixed)
    GTEST_SKIP() << "every rank runs " << kernels.names[0]
                 << ": run with --last-rank-env=UAA_KERNEL=flash_portable (or a CPU with one "
                    "kernel variant only)";
  std::string all_names;
  for (const std::string& n : kernels.names) all_names += n + " ";
  SCOPED_TRACE("kernels by rank: " + all_names);
  auto comm = comm_with_deadline(kDeadline);
  {
    const Plan plan = Plan::from_lengths(*comm, small_shape(), small_q_lens(P), small_kv_lens(P));
    Shard sh(plan, 4);
    Workspace ws;
    const Timed t = timed_capture([&] { forward(plan, sh.args, ws); });
    expect_agreed_error(t.outcome, ErrorCode::mismatch, -1,
                        {"different attention kernel variants", "allow_mixed_kernels"});
    expect_prompt_everywhere(t.seconds);
    expect_out_untouched_everywhere(sh);
  }
  PlanOptions allow;
  allow.allow_mixed_kernels = true;
  const Plan plan =
      Plan::from_lengths(*comm, small_shape(), small_q_lens(P), small_kv_lens(P), allow);
  Shard sh(plan, 4);
  Workspace ws;
  const Outcome o = capture([&] { forward(plan, sh.args, ws); });
  expect_ok_everywhere(o);
  if (o.kind == Outcome::ok) {
    EXPECT_LT(max_error_vs_reference(plan, 4, sh.out), 1e-4);
  }
}

// 5. Peer-memory copy failures (UAA_INJECT_FAULT on the last rank around one call).
// Before: UAA_INJECT_FAULT did not exist, so the faulty call succeeded; and a failing peer read
// (the old path read q/k/v and out from the peers) threw on the reading rank only, while its peers
// waited in the next barrier until their deadline.
void check_injected_copy_failure(const char* point, bool out_must_be_untouched) {
  const int P = world_size(), me = world_rank(), bad = P - 1;
  auto comm = comm_with_deadline(kDeadline);
  if (!comm->can_read_peers()) GTEST_SKIP() << "no peer memory here (ranks on several nodes?)";
  const Plan plan = Plan::from_lengths(*comm, small_shape(), small_q_lens(P), small_kv_lens(P));
  Shard sh(plan, 5);
  Workspace ws;
  const Outcome first = capture([&] { forward(plan, sh.args, ws); });
  expect_ok_everywhere(first);
  EXPECT_TRUE(last_call(ws).peer_memory);
  const std::vector<float> want = sh.out;
  EXPECT_LT(max_error_vs_reference(plan, 5, want), 1e-4);

  sh.reset_out();
  if (me == bad) setenv("UAA_INJECT_FAULT", point, 1);
  const Timed t = timed_capture([&] { forward(plan, sh.args, ws); });
  if (me == bad) unsetenv("UAA_INJECT_FAULT");
  expect_agreed_error(t.outcome, ErrorCode::comm_failure, bad,
                      {std::string("UAA_INJECT_FAULT=") + point});
  expect_prompt_everywhere(t.seconds);
  if (out_must_be_untouched) expect_out_untouched_everywhere(sh);

  // Nothing is left in flight: the same communicator and workspace work, bitwise as before.
  sh.reset_out();
  const Outcome again = capture([&] { forward(plan, sh.args, ws); });
  SCOPED_TRACE("the call after the injected failure");
  expect_ok_everywhere(again);
  EXPECT_TRUE(std::memcmp(sh.out.data(), want.data(), want.size() * sizeof(float)) == 0)
      << "rank " << me << ": the call after the failure differs from the one before it";
}

TEST_F(ForwardFault, PeerWriteFailureOnOneRankIsCommFailureEverywhere) {
  check_injected_copy_failure("peer_write", true);
}

// With peer_read the failing rank (and the others, which did read) have written their own rows
// already: out is not asserted.
TEST_F(ForwardFault, PeerReadFailureOnOneRankIsCommFailureEverywhere) {
  check_injected_copy_failure("peer_read", false);
}

// 6. A rank that arrives at the agreement after its peers gave up on it (deadline 2 s): the peers
// time out, free their workspace and tensors, and (standing in for whatever the process does next)
// put canaries where that memory was; the late rank then calls and must throw, not succeed, not
// crash, and nothing may land in the peers' memory.
// Before: the handshake was an all-gather whose receive stayed posted after a peer timed out; the
// late rank's all-gather completed against the early rank's header, wrote its own into the early
// rank's freed workspace, and went on to read the peers' freed tensors (process_vm_readv).
TEST_F(ForwardFault, RankArrivingAfterItsPeersGaveUpThrowsAndWritesNothing) {
  const int P = world_size(), me = world_rank(), late = P - 1;
  constexpr double kShortDeadline = 2.0;
  auto comm = comm_with_deadline(kShortDeadline);
  AttentionShape s;
  s.q_heads = 8;
  s.kv_heads = 8;
  s.head_dim = 64;
  // 1 MB per tensor: freed by munmap (past the malloc mmap threshold), yet quick to set up.
  const std::vector<std::int64_t> lens(static_cast<std::size_t>(P), 512);
  const Plan plan = Plan::from_lengths(*comm, s, lens, lens);
  auto sh = std::make_unique<Shard>(plan, 6);
  auto ws = std::make_unique<Workspace>();
  const std::size_t tensor_bytes = sh->q.size() * sizeof(float);

  Timed t;
  if (me != late) {
    t = timed_capture([&] { forward(plan, sh->args, *ws); });
    EXPECT_EQ(t.outcome.kind, Outcome::uaa_error) << "rank " << me << " " << t.outcome.str();
    EXPECT_EQ(t.outcome.code, ErrorCode::timeout) << "rank " << me << " " << t.outcome.str();
    EXPECT_GE(t.seconds, kShortDeadline * 0.9) << t.outcome.str();
    EXPECT_LT(t.seconds, kShortDeadline + 3.0) << t.outcome.str();
    // Give everything back, then reuse it: canaries of the freed sizes (big ones are new mappings,
    // most likely in the same place) and many small heap blocks.
    const std::int64_t ws_bytes = ws->bytes_reserved();
    ws.reset();
    sh.reset();
    std::vector<std::vector<unsigned char>> canaries;
    for (int i = 0; i < 4; ++i) canaries.emplace_back(tensor_bytes, 0xA5);
    if (ws_bytes > 0) canaries.emplace_back(static_cast<std::size_t>(ws_bytes), 0xA5);
    for (std::size_t size = 64; size <= 16384; size *= 2)
      for (int i = 0; i < 16; ++i) canaries.emplace_back(size, 0xA5);
    MPI_Barrier(MPI_COMM_WORLD);  // A: the peers gave up and freed everything
    MPI_Barrier(MPI_COMM_WORLD);  // B: the late rank's call is over
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    std::size_t damaged = 0;
    for (const auto& c : canaries)
      for (unsigned char b : c) damaged += b != 0xA5;
    EXPECT_EQ(damaged, 0u) << "rank " << me << ": " << damaged
                           << " bytes of memory it had freed were overwritten after it gave up";
  } else {
    MPI_Barrier(MPI_COMM_WORLD);  // A: arrive only after every peer has given up and freed
    t = timed_capture([&] { forward(plan, sh->args, *ws); });
    EXPECT_EQ(t.outcome.kind, Outcome::uaa_error)
        << "the late rank must not get through an agreement its peers left: " << t.outcome.str();
    EXPECT_TRUE(t.outcome.code == ErrorCode::timeout || t.outcome.code == ErrorCode::comm_failure)
        << t.outcome.str();
    // The failure notice was waiting: no need to wait for anybody (getting through the agreement
    // with a stale vote would end in the next wait, after another deadline).
    EXPECT_LT(t.seconds, kShortDeadline * 0.75) << t.outcome.str();
    if (std::getenv("UAA_FAULT_TEST_VERBOSE"))
      std::printf("[late rank %d] %s (%.3f s)\n", me, t.outcome.str().c_str(), t.seconds);
    MPI_Barrier(MPI_COMM_WORLD);  // B
  }
  // Every rank raises the error of the rank that gave up first (its failure notice).
  const std::vector<std::string> all = allgather_strings(t.outcome.str());
  if (me == 0) {
    for (std::size_t j = 1; j < all.size(); ++j)
      EXPECT_EQ(all[j], all[0]) << "rank " << j << " failed differently from rank 0";
  }
  // No more collectives on `comm`: it is poisoned. Its destruction must not block.
}

// 7. set_num_threads flipping between 1 and 4 on another thread while forward() runs: every result
// bitwise equal to the serial one (the thread count is read once per call).
// Before: the flash kernels' scratch_bytes() and run() each called num_threads(); a change in
// between made run() use more threads than the scratch was sized for and overran it (heap
// corruption, crashes or wrong outputs).
TEST_F(ForwardFault, ThreadCountChangingDuringForwardIsHarmless) {
  const int P = world_size(), me = world_rank();
  auto comm = comm_with_deadline(20);
  AttentionShape s;
  s.q_heads = 8;
  s.kv_heads = 2;
  s.head_dim = 64;
  s.causal = true;
  std::vector<std::int64_t> lens(static_cast<std::size_t>(P));
  for (int r = 0; r < P; ++r) lens[static_cast<std::size_t>(r)] = 300 + 37 * r;
  const Plan plan = Plan::from_lengths(*comm, s, lens, lens);
  Shard sh(plan, 7);
  Workspace ws;
  set_num_threads(1);
  const Outcome first = capture([&] { forward(plan, sh.args, ws); });
  expect_ok_everywhere(first);
  const std::vector<float> want = sh.out;

  std::atomic<bool> stop{false};
  std::atomic<long> flips{0};
  std::thread flipper([&] {
    while (!stop.load(std::memory_order_relaxed)) {  // each value about half of the time
      set_num_threads(4);
      std::this_thread::yield();
      set_num_threads(1);
      std::this_thread::yield();
      flips.fetch_add(1, std::memory_order_relaxed);
    }
  });
  // A fresh workspace for every call: a workspace's scratch only grows, so with one workspace a
  // scratch once sized for 4 threads would hide an undersized one for the rest of the calls.
  constexpr int kCalls = 30;
  int mismatches = 0;
  Outcome failure;
  for (int i = 0; i < kCalls; ++i) {
    sh.reset_out();
    Workspace fresh;
    const Outcome o = capture([&] { forward(plan, sh.args, fresh); });
    if (o.kind != Outcome::ok) {
      failure = o;
      break;  // every rank stops here: a failed call fails everywhere
    }
    mismatches += std::memcmp(sh.out.data(), want.data(), want.size() * sizeof(float)) != 0;
  }
  stop = true;
  flipper.join();
  set_num_threads(0);
  expect_ok_everywhere(failure);
  EXPECT_EQ(mismatches, 0) << "rank " << me << ": " << mismatches << " of " << kCalls
                           << " calls differ from the serial result";
  EXPECT_GT(flips.load(), 0) << "the flipping thread never ran";
}

// 8a. Plan::work and the head ranges with a rank outside [0, ranks()).
// Before: std::vector::at threw std::out_of_range, not uaa::Error.
TEST_F(ForwardFault, PlanQueriesOutsideTheRanksAreInvalidArgument) {
  const int P = world_size();
  auto comm = comm_with_deadline(kDeadline);
  const Plan plan = Plan::from_lengths(*comm, small_shape(), small_q_lens(P), small_kv_lens(P));
  for (int r : {-1, P, INT_MIN, INT_MAX}) {
    SCOPED_TRACE("rank argument " + std::to_string(r));
    const Outcome calls[] = {
        capture([&] { (void)plan.work(r); }),
        capture([&] { (void)plan.q_head_begin(r); }),
        capture([&] { (void)plan.q_head_end(r); }),
        capture([&] { (void)plan.kv_head_begin(r); }),
        capture([&] { (void)plan.kv_head_end(r); }),
    };
    for (const Outcome& o : calls) {
      EXPECT_EQ(o.kind, Outcome::uaa_error) << o.str();
      EXPECT_EQ(o.code, ErrorCode::invalid_argument) << o.str();
      EXPECT_NE(o.message.find(std::to_string(r)), std::string::npos) << o.message;
    }
  }
  EXPECT_NO_THROW((void)plan.work(P - 1));
}

// 8b. Strides so large that the view's extent does not fit the address space, on the last rank
// (3 tokens): ErrorCode::invalid_argument everywhere, nothing read or written.
// Before: the validator computed (tokens - 1) * token_stride + ... in int64 (signed overflow, then
// a meaningless overlap check) and the call went on to read or write at those offsets (a crash).
TEST_F(ForwardFault, StridesPastTheAddressSpaceAreInvalidArgumentEverywhere) {
  const int P = world_size(), me = world_rank(), bad = P - 1;
  auto comm = comm_with_deadline(kDeadline);
  std::vector<std::int64_t> q = small_q_lens(P), kv = small_kv_lens(P);
  q[static_cast<std::size_t>(bad)] = 3;
  kv[static_cast<std::size_t>(bad)] = 3;
  const Plan plan = Plan::from_lengths(*comm, small_shape(), q, kv);
  constexpr std::int64_t kHuge = INT64_MAX / 2;
  struct Case {
    const char* name;
    void (*spoil)(AttentionArgs&);
  };
  const Case cases[] = {
      {"q.token_stride", [](AttentionArgs& a) { a.q.token_stride = kHuge; }},
      {"out.token_stride", [](AttentionArgs& a) { a.out.token_stride = kHuge; }},
      {"k.head_stride", [](AttentionArgs& a) { a.k.head_stride = kHuge; }},  // bytes overflow only
      {"v both strides", [](AttentionArgs& a) { a.v.token_stride = a.v.head_stride = kHuge; }},
  };
  Workspace ws;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Shard sh(plan, 8);
    if (me == bad) c.spoil(sh.args);
    const Timed t = timed_capture([&] { forward(plan, sh.args, ws); });
    expect_agreed_error(t.outcome, ErrorCode::invalid_argument, bad, {"address space"});
    expect_prompt_everywhere(t.seconds);
    expect_out_untouched_everywhere(sh);
  }
  expect_usable(*comm, ws);
}

}  // namespace
}  // namespace uaa::test

namespace {

// Prints failed assertions of a non-zero rank, prefixed with the rank (as mpi_test_main.cpp does).
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (r.failed())
      std::fprintf(stderr, "[rank %d] %s:%d: failure\n%s\n", rank_,
                   r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
  }

 private:
  int rank_;
};

}  // namespace

// tests/common/mpi_test_main.cpp plus --last-rank-env=NAME=VALUE (repeatable): NAME is set on the
// last rank before anything in uaa can read it (UAA_NUM_THREADS and UAA_KERNEL are read once per
// process).
int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const std::string flag = "--last-rank-env=";
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind(flag, 0) == 0 && arg.find('=', flag.size()) != std::string::npos) {
      const std::string kv = arg.substr(flag.size());
      const std::size_t eq = kv.find('=');
      uaa::test::g_last_rank_env.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
      if (rank == size - 1) setenv(kv.substr(0, eq).c_str(), kv.substr(eq + 1).c_str(), 1);
      continue;
    }
    argv[kept++] = argv[i];
  }
  argc = kept;
  ::testing::InitGoogleTest(&argc, argv);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailurePrinter(rank));
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0, any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return any_failed;
}
