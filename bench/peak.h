// The FMA peak of this CPU, measured in the running process (for `uaa bench kernel`'s ratio_to_peak).
//
// fp32: a loop of independent vfmadd (zmm with AVX-512F, else ymm with AVX2+FMA; 2 FLOPs per lane);
// bf16: a loop of independent vdpbf16ps (AVX512_BF16; 2 multiply-adds per fp32 lane = 4 FLOPs per
// lane, 64 per zmm instruction). Enough accumulators to cover latency × pipes on current cores.
// Each loop runs on `threads` threads at once (std::thread, started together); the result is their
// total, timed per thread in CPU time (CLOCK_THREAD_CPUTIME_ID where available), so slices of the
// core taken by other processes do not lower the peak: it is what the core does, best of 4 trials.
#pragma once

#include <string>

namespace uaa::bench {

struct Peak {
  std::string fp32_isa;     // "avx512", "avx2" or "none" (no FMA vector unit: fp32_gflops = 0)
  double fp32_gflops = 0;   // total over the threads
  bool has_bf16 = false;    // the CPU has AVX512_BF16 (vdpbf16ps)
  double bf16_gflops = 0;   // total over the threads; 0 without AVX512_BF16
  int threads = 1;
};

// About `seconds` per loop (best of a few trials).
Peak measure_peak(int threads, double seconds = 0.2);

}  // namespace uaa::bench
