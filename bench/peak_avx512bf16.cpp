// bf16 dot-product peak loop, vdpbf16ps on zmm (compiled with -mavx512f -mavx512bf16; see
// bench/CMakeLists.txt).
#include "peak_loops.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

namespace uaa::bench {

// 16 independent accumulators (latency 6 × 2 pipes needs 12), each instruction 16 fp32 lanes × 2
// multiply-adds = 64 FLOPs.
float peak_loop_dpbf16_avx512(std::int64_t iters) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(0.001f * static_cast<float>(i));
  // bf16 pairs of small values: the sums grow slowly (no overflow, no denormals).
  const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-4f), _mm512_set1_ps(-1e-4f));
  const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(1e-3f));
  for (std::int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
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
float peak_loop_dpbf16_avx512(std::int64_t) { return 0.0f; }
}  // namespace uaa::bench
#endif
