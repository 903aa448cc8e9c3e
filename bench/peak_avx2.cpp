// fp32 FMA peak loop, AVX2 ymm (compiled with -mavx2 -mfma; see bench/CMakeLists.txt).
#include "peak_loops.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace uaa::bench {

// 12 independent accumulators (16 ymm registers: 12 + the two operands; latency 4-5 × 2 pipes needs
// 8-10), each instruction 8 lanes × 2 FLOPs.
float peak_loop_fma_avx2(std::int64_t iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(0.001f * static_cast<float>(i));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (std::int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
  }
  __m256 s = acc[0];
  for (int i = 1; i < 12; ++i) s = _mm256_add_ps(s, acc[i]);
  alignas(32) float f[8];
  _mm256_store_ps(f, s);
  float t = 0;
  for (float x : f) t += x;
  return t;
}

}  // namespace uaa::bench
#else
namespace uaa::bench {
float peak_loop_fma_avx2(std::int64_t) { return 0.0f; }
}  // namespace uaa::bench
#endif
