// FMA peak measurement: picks the ISA loops (peak_avx512.cpp, peak_avx2.cpp, peak_avx512bf16.cpp)
// at run time and runs one on every thread at once.
#include "peak.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <latch>
#include <thread>
#include <vector>

#if defined(__unix__)
#include <time.h>
#endif

#include "peak_loops.h"

namespace uaa::bench {
namespace {

using Clock = std::chrono::steady_clock;

// Seconds this thread has run on a CPU (time sliced away to other processes does not count: the peak
// is what the core does, not what a busy machine leaves over), or wall time where unavailable.
double thread_seconds() {
#if defined(__unix__) && defined(CLOCK_THREAD_CPUTIME_ID)
  timespec ts{};
  if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0)
    return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
#endif
  return std::chrono::duration<double>(Clock::now().time_since_epoch()).count();
}

std::atomic<float> g_sink{0.0f};  // keeps the loops' results alive

// Seconds for `threads` threads to run loop(iters) each, started together; the slowest counts.
double run_parallel(float (*loop)(std::int64_t), std::int64_t iters, int threads) {
  std::latch start(threads + 1);
  std::vector<double> secs(static_cast<std::size_t>(threads));
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      start.arrive_and_wait();
      const double t0 = thread_seconds();
      const float r = loop(iters);
      secs[static_cast<std::size_t>(t)] = thread_seconds() - t0;
      g_sink.store(r, std::memory_order_relaxed);
    });
  start.arrive_and_wait();
  for (auto& th : pool) th.join();
  return *std::max_element(secs.begin(), secs.end());
}

// Best GFLOP/s (total over the threads) of a few trials of about seconds/4 each.
double measure(float (*loop)(std::int64_t), double flops_per_iter, int threads, double seconds) {
  std::int64_t iters = 1 << 14;
  double s = run_parallel(loop, iters, threads);
  while (s < 0.01) {  // calibrate (also warms the core up)
    iters *= 4;
    s = run_parallel(loop, iters, threads);
  }
  const double trial = std::max(0.01, seconds / 4);
  iters = std::max<std::int64_t>(1, static_cast<std::int64_t>(static_cast<double>(iters) * trial / s));
  double best = 0;
  for (int r = 0; r < 4; ++r) {
    const double t = run_parallel(loop, iters, threads);
    best = std::max(best, flops_per_iter * static_cast<double>(iters) * threads / t * 1e-9);
  }
  return best;
}

}  // namespace

Peak measure_peak(int threads, double seconds) {
  Peak p;
  p.threads = std::max(1, threads);
  p.fp32_isa = "none";
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    p.fp32_isa = "avx512";
    p.fp32_gflops = measure(peak_loop_fma_avx512, kFlopsPerIterFmaAvx512, p.threads, seconds);
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    p.fp32_isa = "avx2";
    p.fp32_gflops = measure(peak_loop_fma_avx2, kFlopsPerIterFmaAvx2, p.threads, seconds);
  }
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16")) {
    p.has_bf16 = true;
    p.bf16_gflops = measure(peak_loop_dpbf16_avx512, kFlopsPerIterDpbf16Avx512, p.threads, seconds);
  }
#else
  (void)seconds;
#endif
  return p;
}

}  // namespace uaa::bench
