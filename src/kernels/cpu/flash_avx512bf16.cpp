// Flash attention for bf16 inputs with AVX512_BF16 dot products (vdpbf16ps), built with
// -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512bf16 -mfma (set in CMakeLists.txt).
//
// Each vdpbf16ps does 16 lanes × 2 products, twice the work of an fp32 FMA, so both products run on
// bf16 pairs: Q·Kᵀ pairs adjacent head dims (Kᵀ packed [D/2][64 keys][2]), P·V pairs adjacent keys
// (V packed [32 key pairs][Dp][2]) with P rounded to bf16 (as GPU flash attention does); scores,
// softmax and accumulators stay fp32. The row sum l is taken over the fp32 P. Highway 1.0.3 does not
// emit this instruction, hence intrinsics. fp32 inputs use run_avx512.
// The backward with bf16 inputs (BwdMicroBf16Dp below) runs all five products with vdpbf16ps,
// rounding P and dS to bf16 for dV = Pᵀ·dO, dK = dSᵀ·Q and dQ = dS·K (as GPU flash attention does).
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

  // Row r of P·V over the tile's keys [lo, hi) only (flash_impl.h, "Non-finite values"): whole key
  // pairs as pv_block_bf16 does them; a pair that holds an invisible key (odd lo, odd hi) has that
  // key's V lane zeroed (its P is 0 already), which for finite V is the same dot product.
  static void pv_range(const Problem& p, const float*, const std::uint16_t* pb, const char* vt,
                       float* O, const float* alpha, std::int64_t r, std::int64_t lo, std::int64_t hi) {
    const std::int64_t Dp = p.padded_dim;
    const auto* v = reinterpret_cast<const std::uint16_t*>(vt);
    const std::uint16_t* P = pb + r * kBc;
    // Lane masks of the first and last pair: the low half of a pair is its even key.
    const __m512i all = _mm512_set1_epi32(-1);
    const __m512i first = lo % 2 ? _mm512_set1_epi32(static_cast<int>(0xffff0000u)) : all;  // lo - 1 out
    const __m512i last = hi % 2 ? _mm512_set1_epi32(0xffff) : all;                           // hi out
    const std::int64_t f0 = lo / 2, f1 = (hi + 1) / 2;
    for (std::int64_t c = 0; c < Dp; c += 16) {
      float* o = O + r * Dp + c;
      __m512 acc = _mm512_mul_ps(_mm512_load_ps(o), _mm512_set1_ps(alpha[r]));
      for (std::int64_t f = f0; f < f1; ++f) {
        __m512i vv = _mm512_load_si512(v + (f * Dp + c) * 2);
        if (f == f0) vv = _mm512_and_si512(vv, first);
        if (f == f1 - 1) vv = _mm512_and_si512(vv, last);
        acc = dpbf16(acc, _mm512_set1_epi32(static_cast<int>(load_pair(P + 2 * f))), vv);
      }
      _mm512_store_ps(o, acc);
    }
  }
};

// ---- backward with bf16 inputs (flash_bwd_impl.h) ---------------------------------------------

// C[r][0, NC·16) (+)= Σ_{f<F} (A[r][f].lo · B[f][·][0] + A[r][f].hi · B[f][·][1]) for MR rows, one
// vdpbf16ps per (element, pair f), f ascending. A[r][f] is a dword of two bf16 at A + r·ars + f·afs
// (broadcast); B[f] is NC·16 lanes of bf16 pairs at B + f·bs (bs in bf16 elements, 64-byte aligned).
// kAcc: start from C, else from +0.
template <int MR, int NC, bool kAcc>
inline void dp_block(const std::uint32_t* A, std::int64_t ars, std::int64_t afs, const std::uint16_t* B,
                     std::int64_t bs, std::int64_t F, float* C, std::int64_t cs) {
  __m512 acc[MR][NC];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) acc[r][c] = kAcc ? _mm512_load_ps(C + r * cs + c * 16) : _mm512_setzero_ps();
  for (std::int64_t f = 0; f < F; ++f) {
    __m512i b[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) b[c] = _mm512_load_si512(B + f * bs + c * 32);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512i a = _mm512_set1_epi32(static_cast<int>(A[r * ars + f * afs]));
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) acc[r][c] = dpbf16(acc[r][c], a, b[c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) _mm512_store_ps(C + r * cs + c * 16, acc[r][c]);
}

// C[0, M)[0, N) += the dp_block products over F pairs; N a multiple of 16. Blocks of 6 rows × 4 zmm.
inline void dp_gemm(std::int64_t M, std::int64_t N, std::int64_t F, const std::uint32_t* A, std::int64_t ars,
                    std::int64_t afs, const std::uint16_t* B, std::int64_t bs, float* C, std::int64_t cs) {
  const std::int64_t nv = N / 16;
  for (std::int64_t r = 0; r < M; r += 6)
    with_rows(min64(6, M - r), [&]<int MR>() {
      const std::uint32_t* a = A + r * ars;
      float* c0 = C + r * cs;
      std::int64_t c = 0;
      for (; c + 4 <= nv; c += 4) dp_block<MR, 4, true>(a, ars, afs, B + c * 32, bs, F, c0 + c * 16, cs);
      switch (nv - c) {
        case 0: break;
        case 1: dp_block<MR, 1, true>(a, ars, afs, B + c * 32, bs, F, c0 + c * 16, cs); break;
        case 2: dp_block<MR, 2, true>(a, ars, afs, B + c * 32, bs, F, c0 + c * 16, cs); break;
        default: dp_block<MR, 3, true>(a, ars, afs, B + c * 32, bs, F, c0 + c * 16, cs); break;
      }
    });
}

// out[d][2] = (x[d], y[d]) for d < Dp (out 64-byte aligned, Dp a multiple of 16): rows x, y of D
// bf16 values (y null: zeros), zeros past D.
inline void interleave_rows(const std::uint16_t* x, const std::uint16_t* y, std::int64_t D, std::int64_t Dp,
                            std::uint16_t* out) {
  struct Idx {
    alignas(64) std::uint16_t lo[32], hi[32];
  };
  static constexpr Idx idx = [] {
    Idx t{};
    for (int i = 0; i < 16; ++i) {
      t.lo[2 * i] = static_cast<std::uint16_t>(i);            // x[i]
      t.lo[2 * i + 1] = static_cast<std::uint16_t>(32 + i);   // y[i]
      t.hi[2 * i] = static_cast<std::uint16_t>(16 + i);       // x[16 + i]
      t.hi[2 * i + 1] = static_cast<std::uint16_t>(48 + i);   // y[16 + i]
    }
    return t;
  }();
  const __m512i lo = _mm512_load_si512(idx.lo), hi = _mm512_load_si512(idx.hi);
  for (std::int64_t d0 = 0; d0 < Dp; d0 += 32) {
    __m512i a, b;
    if (d0 + 32 <= D) {
      a = _mm512_loadu_si512(x + d0);
      b = y ? _mm512_loadu_si512(y + d0) : _mm512_setzero_si512();
    } else {  // the tail: copy what is there (no masked load past a row)
      alignas(64) std::uint16_t tx[32] = {}, ty[32] = {};
      for (std::int64_t d = d0; d < D; ++d) {
        tx[d - d0] = x[d];
        ty[d - d0] = y ? y[d] : 0;
      }
      a = _mm512_load_si512(tx);
      b = _mm512_load_si512(ty);
    }
    _mm512_store_si512(out + d0 * 2, _mm512_permutex2var_epi16(a, lo, b));
    if (d0 + 16 < Dp) _mm512_store_si512(out + d0 * 2 + 32, _mm512_permutex2var_epi16(a, hi, b));
  }
}

// Backward with bf16 inputs: all five products run on bf16 pairs with vdpbf16ps, fp32 accumulators.
//   S = Q·Kᵀ, dP = dO·Vᵀ: pairs of adjacent head dims (Kᵀ, Vᵀ packed [D2][64 keys][2], Q and dO
//     rows [D2][2]); the products are exact (bf16 inputs), the sum runs over pairs ascending.
//   dV = Pᵀ·dO, dK = dSᵀ·Q: pairs of rows (2f, 2f + 1) counted from the query tile's first row
//     (P and dS rounded to bf16 as [kBr/2][64 keys][2], dO and Q rows as [kBr/2][Dp][2]);
//   dQ = dS·K: pairs of keys (2f, 2f + 1) of the key tile (dS rounded to bf16 [kBr][64], K packed
//     [32 key pairs][Dp][2]).
// P and dS are rounded to bf16 (round to nearest even) once, from the fp32 values of
// flash_bwd_impl.h (dS is computed from the fp32 P); dK and dQ take the same rounded dS. This is the
// precision choice GPU flash attention makes for these three products.
struct BwdMicroBf16Dp {
  static_assert(kBc == 64, "qk_block_bf16 covers a key tile with 4 zmm");
  static_assert(kBr % 2 == 0, "row pairs never straddle a query tile");

  // Kᵀ and Vᵀ as pairs of head dims [D2][kBc][2] (the dword of (key c, pair e) at e·kBc + c), K as
  // key pairs [kBc/2][Dp][2]; zero past kv_total and past D.
  static void pack_kv(const BwdProblem& p, std::int64_t kvh, std::int64_t t, char* blk) {
    const std::int64_t D = p.head_dim, D2 = (D + 1) / 2, Dp = p.padded_dim, j0 = t * kBc;
    auto* Kt = reinterpret_cast<std::uint32_t*>(blk + p.layout.kt_off);    // [D2][kBc]
    auto* Vt = reinterpret_cast<std::uint32_t*>(blk + p.layout.vt_off);    // [D2][kBc]
    auto* Kp = reinterpret_cast<std::uint16_t*>(blk + p.layout.krow_off);  // [kBc/2][Dp][2]
    const std::uint16_t* krow[kBc];
    std::int64_t s = find_segment(p.k, p.kv_segments, j0);
    for (std::int64_t c = 0; c < kBc; ++c) {
      const std::int64_t j = j0 + c;
      if (j >= p.kv_total) {
        for (std::int64_t e = 0; e < D2; ++e) Kt[e * kBc + c] = Vt[e * kBc + c] = 0;
        krow[c] = nullptr;
        continue;
      }
      while (j >= p.k[s].begin + p.k[s].tokens) ++s;
      const Segment& ks = p.k[s];
      const Segment& vs = p.v[s];
      const auto* ksrc = static_cast<const std::uint16_t*>(ks.data) + (j - ks.begin) * ks.token_stride +
                         kvh * ks.head_stride;
      const auto* vsrc = static_cast<const std::uint16_t*>(vs.data) + (j - vs.begin) * vs.token_stride +
                         kvh * vs.head_stride;
      krow[c] = ksrc;
      for (std::int64_t e = 0; e < D / 2; ++e) {
        Kt[e * kBc + c] = load_pair(ksrc + 2 * e);
        Vt[e * kBc + c] = load_pair(vsrc + 2 * e);
      }
      if (D % 2) {  // the last pair is (x[D − 1], 0)
        Kt[(D / 2) * kBc + c] = ksrc[D - 1];
        Vt[(D / 2) * kBc + c] = vsrc[D - 1];
      }
    }
    for (std::int64_t f = 0; f < kBc / 2; ++f) {
      std::uint16_t* out = Kp + f * Dp * 2;
      if (krow[2 * f])
        interleave_rows(krow[2 * f], krow[2 * f + 1], D, Dp, out);
      else
        for (std::int64_t d = 0; d < Dp * 2; ++d) out[d] = 0;
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
  // Rows [r0, r1) (one query tile of the step) as row pairs [kBr/2][Dp][2] from r0; the partner of
  // an odd last row and the head dims past D are 0.
  static void pack_row_pairs(const BwdProblem& p, const Segment* segs, std::int64_t h, std::int64_t r0,
                             std::int64_t r1, std::uint16_t* out) {
    const std::int64_t D = p.head_dim, Dp = p.padded_dim;
    std::int64_t s = find_segment(segs, p.q_segments, r0);
    const auto row = [&](std::int64_t i) {
      while (i >= segs[s].begin + segs[s].tokens) ++s;
      const Segment& g = segs[s];
      return static_cast<const std::uint16_t*>(g.data) + (i - g.begin) * g.token_stride + h * g.head_stride;
    };
    for (std::int64_t i = r0; i < r1; i += 2) {
      const std::uint16_t* x = row(i);
      const std::uint16_t* y = i + 1 < r1 ? row(i + 1) : nullptr;
      interleave_rows(x, y, D, Dp, out + ((i - r0) / 2) * Dp * 2);
    }
  }
  static void pack_rows(const BwdProblem& p, const BwdHead& hb, std::int64_t h, std::int64_t u,
                        std::int64_t r0, std::int64_t r1) {
    pack_pairs(p, p.q, h, r0, r1, hb.q_pairs);
    pack_pairs(p, p.dout, h, r0, r1, hb.do_pairs);
    pack_row_pairs(p, p.q, h, r0, r1, hb.q_rowpairs + u * kBr * p.padded_dim);
    pack_row_pairs(p, p.dout, h, r0, r1, hb.do_rowpairs + u * kBr * p.padded_dim);
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

  // The row pairs of a tile: pair 0 is rows (a0, a0 + 1), a0 the even offset from r0 at or before
  // a; n pairs cover rows up to a + m (a row before a or at a + m is a zero row).
  static std::int64_t first_pair_row(const BwdTile& w) { return w.r0 + ((w.a - w.r0) & ~std::int64_t{1}); }
  static std::int64_t row_pairs(const BwdTile& w) { return (w.a + w.m - first_pair_row(w) + 1) / 2; }

  // X rows [a, a + m) fp32 [.][kBc] (row a at X) to bf16 row pairs out[f][c] = (X[a0 + 2f][c],
  // X[a0 + 2f + 1][c]), rows outside [a, a + m) as 0; round to nearest even.
  static void emit_row_pairs(const float* X, const BwdTile& w, std::uint32_t* out) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                         22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const std::int64_t lo = first_pair_row(w) - w.a, n = row_pairs(w);
    for (std::int64_t f = 0; f < n; ++f) {
      const std::int64_t x0 = lo + 2 * f, x1 = x0 + 1;
      const float* r0 = x0 >= 0 ? X + x0 * kBc : nullptr;
      const float* r1 = x1 < w.m ? X + x1 * kBc : nullptr;
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512 v0 = r0 ? _mm512_load_ps(r0 + c * 16) : _mm512_setzero_ps();
        const __m512 v1 = r1 ? _mm512_load_ps(r1 + c * 16) : _mm512_setzero_ps();
        const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);  // [bf16 v0 | bf16 v1]
        _mm512_store_si512(out + f * kBc + c * 16, _mm512_permutexvar_epi16(idx, h));
      }
    }
  }

  // dV[keys k0..kn) += Pᵀ·dO over the tile's row pairs, P rounded to bf16.
  static void dv(const BwdProblem& p, const BwdHead& hb, const BwdBuffers& tb, const BwdTile& w) {
    const std::int64_t Dp = p.padded_dim, f0 = (first_pair_row(w) - w.r0) / 2;
    emit_row_pairs(tb.p, w, tb.p_rowpairs);
    dp_gemm(w.kn - w.k0, Dp, row_pairs(w), tb.p_rowpairs + w.k0, 1, kBc,
            hb.do_rowpairs + w.u * kBr * Dp + f0 * Dp * 2, Dp * 2, tb.dv + w.k0 * Dp, Dp);
  }
  // dK[keys k0..kn) += dSᵀ·Q likewise, dS rounded to bf16; also rounds dS rows for dq.
  static void dk(const BwdProblem& p, const BwdHead& hb, const BwdBuffers& tb, const BwdTile& w) {
    const std::int64_t Dp = p.padded_dim, f0 = (first_pair_row(w) - w.r0) / 2;
    emit_row_pairs(tb.ds, w, tb.ds_rowpairs);
    for (std::int64_t r = 0; r < w.m; ++r)
#pragma GCC unroll 2
      for (int c = 0; c < 2; ++c) {
        const float* x = tb.ds + r * kBc + c * 32;
        _mm512_store_si512(tb.ds_bf16 + r * kBc + c * 32,
                           (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(x + 16), _mm512_load_ps(x)));
      }
    dp_gemm(w.kn - w.k0, Dp, row_pairs(w), tb.ds_rowpairs + w.k0, 1, kBc,
            hb.q_rowpairs + w.u * kBr * Dp + f0 * Dp * 2, Dp * 2, tb.dk + w.k0 * Dp, Dp);
  }
  // dQ[rows [a, a + m)] += dS·K over the key pairs (t0 + 2f, t0 + 2f + 1) that hold keys
  // [t0 + k0, t0 + kn) (an odd k0 starts, an odd kn ends, with a pair whose other key no row of
  // [a, a + m) sees: dS 0 there).
  static void dq(const BwdProblem& p, const BwdHead& hb, const BwdBuffers& tb, const char* blk,
                 const BwdTile& w) {
    const std::int64_t Dp = p.padded_dim, f0 = w.k0 / 2;
    dp_gemm(w.m, Dp, (w.kn + 1) / 2 - f0, reinterpret_cast<const std::uint32_t*>(tb.ds_bf16) + f0, kBc / 2, 1,
            reinterpret_cast<const std::uint16_t*>(blk + p.layout.krow_off) + f0 * Dp * 2, Dp * 2,
            hb.dq + (w.a - p.q_first) * Dp, Dp);
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
