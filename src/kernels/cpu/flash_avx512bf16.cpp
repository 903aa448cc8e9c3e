// Flash attention for bf16 inputs with AVX512_BF16 dot products (vdpbf16ps), built with
// -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512bf16 -mfma (set in CMakeLists.txt).
//
// Each vdpbf16ps does 16 lanes × 2 products, twice the work of an fp32 FMA, so both products run on
// bf16 pairs: Q·Kᵀ pairs adjacent head dims (Kᵀ packed [D/2][64 keys][2]), P·V pairs adjacent keys
// (V packed [32 key pairs][Dp][2]) with P rounded to bf16 (as GPU flash attention does); scores,
// softmax and accumulators stay fp32. The row sum l is taken over the fp32 P. Highway 1.0.3 does not
// emit this instruction, hence intrinsics. fp32 inputs use run_avx512.
// The backward (BwdMicroBf16Dp below) takes vdpbf16ps only for the products of two bf16 inputs.
#include <cstddef>
#include <cstdint>
#include <sched.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels/cpu/flash_problem.h"

namespace uaa::detail::flash {
#if defined(__x86_64__)
namespace isa_avx512bf16 {
#include "kernels/cpu/flash_math.h"
#include "kernels/cpu/simd_avx512.h"
#include "kernels/cpu/flash_impl.h"
#include "kernels/cpu/flash_bwd_impl.h"

inline __m512 dpbf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

inline std::uint32_t load_pair(const std::uint16_t* p) {
  std::uint32_t u;
  __builtin_memcpy(&u, p, sizeof u);
  return u;
}

// S[r][0, 64) = scale · Σ_{d pairs} (q[r][2e] k[2e] + q[r][2e+1] k[2e+1]); pairs ascending.
template <int MR>
inline void qk_block_bf16(const std::uint16_t* q, std::int64_t D2, const std::uint16_t* kt, float* s,
                          float scale) {
  __m512 acc[MR][4];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (std::int64_t e = 0; e < D2; ++e) {
    __m512i b[4];
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) b[c] = _mm512_load_si512(kt + (e * kBc + c * 16) * 2);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(load_pair(q + (r * D2 + e) * 2)));
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) acc[r][c] = dpbf16(acc[r][c], a, b[c]);
    }
  }
  const __m512 sc = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) _mm512_store_ps(s + r * kBc + c * 16, _mm512_mul_ps(acc[r][c], sc));
}

// O[r][0, NC*16) = α[r]·O[r] + Σ_{key pairs} (P[r][2f] v[2f] + P[r][2f+1] v[2f+1]); pairs ascending.
template <int MR, int NC>
inline void pv_block_bf16(const std::uint16_t* P, const std::uint16_t* v, std::int64_t Dp, float* o,
                          const float* alpha) {
  __m512 acc[MR][NC];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    const __m512 al = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_mul_ps(_mm512_load_ps(o + r * Dp + c * 16), al);
  }
  for (std::int64_t f = 0; f < kBc / 2; ++f) {
    __m512i b[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) b[c] = _mm512_load_si512(v + (f * Dp + c * 16) * 2);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(load_pair(P + r * kBc + 2 * f)));
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) acc[r][c] = dpbf16(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) _mm512_store_ps(o + r * Dp + c * 16, acc[r][c]);
}

struct MicroBf16Dp {
  static_assert(kBc == 64, "qk_block_bf16 covers a key tile with 4 zmm");

  // Q tile as bf16 pairs: [kBr][D2][2], an odd head dim padded with a zero.
  static void pack_q(const Problem& p, std::int64_t h, std::int64_t r0, std::int64_t nr, char* qt) {
    const std::int64_t D = p.head_dim, D2 = (D + 1) / 2;
    auto* out = reinterpret_cast<std::uint16_t*>(qt);
    std::int64_t s = find_segment(p.q, p.q_segments, r0);
    for (std::int64_t r = 0; r < nr; ++r) {
      const std::int64_t i = r0 + r;
      while (i >= p.q[s].begin + p.q[s].tokens) ++s;
      const Segment& g = p.q[s];
      const auto* row = static_cast<const std::uint16_t*>(g.data) + (i - g.begin) * g.token_stride +
                        h * g.head_stride;
      for (std::int64_t d = 0; d < D; ++d) out[r * D2 * 2 + d] = row[d];
      if (D % 2) out[r * D2 * 2 + D] = 0;
    }
  }

  static void pack_kv(const Problem& p, std::int64_t kvh, std::int64_t t, char* kt, char* vt) {
    const std::int64_t D = p.head_dim, D2 = (D + 1) / 2, Dp = p.padded_dim, j0 = t * kBc;
    auto* K = reinterpret_cast<std::uint16_t*>(kt);   // [D2][kBc][2]
    auto* Vt = reinterpret_cast<std::uint16_t*>(vt);  // [kBc/2][Dp][2]
    std::int64_t s = find_segment(p.k, p.kv_segments, j0);
    for (std::int64_t c = 0; c < kBc; ++c) {
      const std::int64_t j = j0 + c;
      std::uint16_t* kcol = K + c * 2;
      std::uint16_t* vrow = Vt + (c / 2) * Dp * 2 + (c % 2);
      if (j >= p.kv_total) {
        for (std::int64_t d = 0; d < D2 * 2; ++d) kcol[(d / 2) * kBc * 2 + d % 2] = 0;
        for (std::int64_t d = 0; d < Dp; ++d) vrow[d * 2] = 0;
        continue;
      }
      while (j >= p.k[s].begin + p.k[s].tokens) ++s;
      const Segment& ks = p.k[s];
      const Segment& vs = p.v[s];
      const auto* kr = static_cast<const std::uint16_t*>(ks.data) + (j - ks.begin) * ks.token_stride +
                       kvh * ks.head_stride;
      const auto* vr = static_cast<const std::uint16_t*>(vs.data) + (j - vs.begin) * vs.token_stride +
                       kvh * vs.head_stride;
      for (std::int64_t d = 0; d < D; ++d) kcol[(d / 2) * kBc * 2 + d % 2] = kr[d];
      if (D % 2) kcol[(D / 2) * kBc * 2 + 1] = 0;
      for (std::int64_t d = 0; d < D; ++d) vrow[d * 2] = vr[d];
      for (std::int64_t d = D; d < Dp; ++d) vrow[d * 2] = 0;
    }
  }

  static void qk(const Problem& p, const char* qt, const char* kt, float* S, std::int64_t a,
                 std::int64_t nr, float scale) {
    const std::int64_t D2 = (p.head_dim + 1) / 2;
    const auto* q = reinterpret_cast<const std::uint16_t*>(qt);
    const auto* k = reinterpret_cast<const std::uint16_t*>(kt);
    for (std::int64_t r = a; r < nr; r += 6)
      with_rows(min64(6, nr - r), [&]<int MR>() {
        qk_block_bf16<MR>(q + r * D2 * 2, D2, k, S + r * kBc, scale);
      });
  }

  // P row (64 fp32, after the softmax) to bf16, round to nearest even.
  static void emit_p(const float* s, std::uint16_t* pb) {
#pragma GCC unroll 2
    for (int c = 0; c < 2; ++c) {
      const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_load_ps(s + c * 32 + 16), _mm512_load_ps(s + c * 32));
      _mm512_store_si512(pb + c * 32, (__m512i)h);
    }
  }

  template <int MR>
  static void pv_rows(const std::uint16_t* P, const std::uint16_t* v, std::int64_t Dp, float* o,
                      const float* alpha) {
    const std::int64_t nv = Dp / 16;
    std::int64_t c = 0;
    for (; c + 4 <= nv; c += 4) pv_block_bf16<MR, 4>(P, v + c * 32, Dp, o + c * 16, alpha);
    switch (nv - c) {
      case 0: break;
      case 1: pv_block_bf16<MR, 1>(P, v + c * 32, Dp, o + c * 16, alpha); break;
      case 2: pv_block_bf16<MR, 2>(P, v + c * 32, Dp, o + c * 16, alpha); break;
      default: pv_block_bf16<MR, 3>(P, v + c * 32, Dp, o + c * 16, alpha); break;
    }
  }

  static void pv(const Problem& p, const float*, const std::uint16_t* pb, const char* vt, float* O,
                 const float* alpha, std::int64_t a, std::int64_t nr) {
    const std::int64_t Dp = p.padded_dim;
    const auto* v = reinterpret_cast<const std::uint16_t*>(vt);
    for (std::int64_t r = a; r < nr; r += 6)
      with_rows(min64(6, nr - r), [&]<int MR>() {
        pv_rows<MR>(pb + r * kBc, v, Dp, O + r * Dp, alpha + r);
      });
  }

  // Row r of P·V over the tile's first n keys only (flash_impl.h, "Non-finite values"): whole key
  // pairs as pv_block_bf16 does them; for odd n the last pair's invisible key has its V lane zeroed
  // (its P is 0 already), which for finite V is the same dot product.
  static void pv_prefix(const Problem& p, const float*, const std::uint16_t* pb, const char* vt,
                        float* O, const float* alpha, std::int64_t r, std::int64_t n) {
    const std::int64_t Dp = p.padded_dim;
    const auto* v = reinterpret_cast<const std::uint16_t*>(vt);
    const std::uint16_t* P = pb + r * kBc;
    const __m512i low = _mm512_set1_epi32(0xffff);
    for (std::int64_t c = 0; c < Dp; c += 16) {
      float* o = O + r * Dp + c;
      __m512 acc = _mm512_mul_ps(_mm512_load_ps(o), _mm512_set1_ps(alpha[r]));
      for (std::int64_t f = 0; f < n / 2; ++f)
        acc = dpbf16(acc, _mm512_set1_epi32(static_cast<int>(load_pair(P + 2 * f))),
                     _mm512_load_si512(v + (f * Dp + c) * 2));
      if (n % 2) {
        const std::int64_t f = n / 2;
        acc = dpbf16(acc, _mm512_set1_epi32(static_cast<int>(load_pair(P + 2 * f))),
                     _mm512_and_si512(_mm512_load_si512(v + (f * Dp + c) * 2), low));
      }
      _mm512_store_ps(o, acc);
    }
  }
};

// Backward with bf16 inputs (flash_bwd_impl.h): S = Q·Kᵀ and dP = dO·Vᵀ multiply the inputs
// themselves, so they run on bf16 pairs of adjacent head dims with vdpbf16ps (Kᵀ and Vᵀ packed
// [D2][64 keys][2], Q and dO rows [D2][2]; the products are exact, the sum runs over pairs in
// ascending order). P and dS are fp32 results, so the products over them (dV, dK, dQ) stay fp32.
struct BwdMicroBf16Dp {
  static_assert(kBc == 64, "qk_block_bf16 covers a key tile with 4 zmm");

  static void pack_kv(const BwdProblem& p, std::int64_t kvh, std::int64_t t, char* blk) {
    const std::int64_t D = p.head_dim, D2 = (D + 1) / 2, Dp = p.padded_dim, j0 = t * kBc;
    auto* Kt = reinterpret_cast<std::uint16_t*>(blk + p.layout.kt_off);  // [D2][kBc][2]
    auto* Vt = reinterpret_cast<std::uint16_t*>(blk + p.layout.vt_off);  // [D2][kBc][2]
    auto* Kr = reinterpret_cast<float*>(blk + p.layout.krow_off);        // [kBc][Dp]
    std::int64_t s = find_segment(p.k, p.kv_segments, j0);
    for (std::int64_t c = 0; c < kBc; ++c) {
      const std::int64_t j = j0 + c;
      std::uint16_t* kcol = Kt + c * 2;
      std::uint16_t* vcol = Vt + c * 2;
      float* kr = Kr + c * Dp;
      if (j >= p.kv_total) {
        for (std::int64_t d = 0; d < D2 * 2; ++d) kcol[(d / 2) * kBc * 2 + d % 2] = 0;
        for (std::int64_t d = 0; d < D2 * 2; ++d) vcol[(d / 2) * kBc * 2 + d % 2] = 0;
        for (std::int64_t d = 0; d < Dp; ++d) kr[d] = 0.0f;
        continue;
      }
      while (j >= p.k[s].begin + p.k[s].tokens) ++s;
      const Segment& ks = p.k[s];
      const Segment& vs = p.v[s];
      const auto* ksrc = static_cast<const std::uint16_t*>(ks.data) + (j - ks.begin) * ks.token_stride +
                         kvh * ks.head_stride;
      const auto* vsrc = static_cast<const std::uint16_t*>(vs.data) + (j - vs.begin) * vs.token_stride +
                         kvh * vs.head_stride;
      for (std::int64_t d = 0; d < D; ++d) {
        kcol[(d / 2) * kBc * 2 + d % 2] = ksrc[d];
        vcol[(d / 2) * kBc * 2 + d % 2] = vsrc[d];
        kr[d] = f32_from_bf16(ksrc[d]);
      }
      if (D % 2) kcol[(D / 2) * kBc * 2 + 1] = vcol[(D / 2) * kBc * 2 + 1] = 0;
      for (std::int64_t d = D; d < Dp; ++d) kr[d] = 0.0f;
    }
  }

  // Q and dO rows [r0, r1) of local head h as bf16 pairs [D2][2], an odd head dim padded with 0.
  static void pack_pairs(const BwdProblem& p, const Segment* segs, std::int64_t h, std::int64_t r0,
                         std::int64_t r1, std::uint16_t* out) {
    const std::int64_t D = p.head_dim, D2 = (D + 1) / 2;
    std::int64_t s = find_segment(segs, p.q_segments, r0);
    for (std::int64_t i = r0; i < r1; ++i) {
      while (i >= segs[s].begin + segs[s].tokens) ++s;
      const Segment& g = segs[s];
      const auto* row = static_cast<const std::uint16_t*>(g.data) + (i - g.begin) * g.token_stride +
                        h * g.head_stride;
      std::uint16_t* o = out + (i - p.q_first) * D2 * 2;
      for (std::int64_t d = 0; d < D; ++d) o[d] = row[d];
      if (D % 2) o[D] = 0;
    }
  }
  static void pack_rows(const BwdProblem& p, const BwdHead& hb, std::int64_t h, std::int64_t r0,
                        std::int64_t r1) {
    pack_pairs(p, p.q, h, r0, r1, hb.q_pairs);
    pack_pairs(p, p.dout, h, r0, r1, hb.do_pairs);
  }

  static void product(const BwdProblem& p, const std::uint16_t* rows, std::int64_t a, std::int64_t m,
                      const char* tile, float* out) {
    const std::int64_t D2 = (p.head_dim + 1) / 2;
    const std::uint16_t* x = rows + (a - p.q_first) * D2 * 2;
    const auto* y = reinterpret_cast<const std::uint16_t*>(tile);
    for (std::int64_t r = 0; r < m; r += 6)
      with_rows(min64(6, m - r), [&]<int MR>() {
        qk_block_bf16<MR>(x + r * D2 * 2, D2, y, out + r * kBc, 1.0f);  // · 1 is exact
      });
  }
  static void qk(const BwdProblem& p, const BwdHead& hb, std::int64_t a, std::int64_t m, const char* blk,
                 float* S) {
    product(p, hb.q_pairs, a, m, blk + p.layout.kt_off, S);
  }
  static void dov(const BwdProblem& p, const BwdHead& hb, std::int64_t a, std::int64_t m, const char* blk,
                  float* dP) {
    product(p, hb.do_pairs, a, m, blk + p.layout.vt_off, dP);
  }
};
}  // namespace isa_avx512bf16

void run_avx512bf16(const Problem& p) {
  isa_avx512bf16::run_flash<isa_avx512bf16::VecAvx512, isa_avx512bf16::MicroBf16Dp>(p);
}

// bf16 inputs only (fp32 takes run_bwd_avx512); needs the bf16-pair layout (q_pairs, do_pairs).
void run_bwd_avx512bf16(const BwdProblem& p) {
  isa_avx512bf16::run_flash_bwd<isa_avx512bf16::VecAvx512, isa_avx512bf16::BwdMicroBf16Dp>(p);
}

#else
// Not x86-64: never dispatched to (dispatch.cpp finds no avx512bf16); keeps the link whole.
void run_avx512bf16(const Problem& p) { run_portable(p); }
void run_bwd_avx512bf16(const BwdProblem& p) { run_bwd_portable(p); }
#endif
}  // namespace uaa::detail::flash
