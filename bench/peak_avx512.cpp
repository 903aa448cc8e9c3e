// fp32 FMA peak loop, AVX-512F zmm (compiled with -mavx512f -mfma; see bench/CMakeLists.txt).
#include "peak_loops.h"

#if defined(__AVX512F__)
#include <immintrin.h>

namespace uaa::bench {

// 16 independent accumulators (latency 4 × 2 FMA pipes needs 8; 16 also covers slower cores), each
// instruction 16 lanes × 2 FLOPs.
float peak_loop_fma_avx512(std::int64_t iters) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (std::int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], a, b);
  }
  __m512 s = acc[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, acc[i]);
  alignas(64) float f[16];
  _mm512_store_ps(f, s);
  float t = 0;
  for (float x : f) t += x;
  return t;
}

}  // namespace uaa::bench
#else
namespace uaa::bench {
float peak_loop_fma_avx512(std::int64_t) { return 0.0f; }
}  // namespace uaa::bench
#endif
