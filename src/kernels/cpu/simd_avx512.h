// AVX-512F vector operations for flash_impl.h (included inside an ISA namespace; no includes here).
struct VecAvx512 {
  using F = __m512;
  static constexpr int W = 16;
  static constexpr int kQkRows = 6, kQkCols = 4;  // 24 accumulators of 32 zmm
  static constexpr int kPvRows = 6, kPvCols = 4;
  static F zero() { return _mm512_setzero_ps(); }
  static F set1(float x) { return _mm512_set1_ps(x); }
  static F load(const float* p) { return _mm512_load_ps(p); }
  static F loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F x) { _mm512_store_ps(p, x); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F max(F a, F b) { return _mm512_max_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }  // a*b + c, one rounding
  static float hmax(F a) { return _mm512_reduce_max_ps(a); }
  static float hsum(F a) { return _mm512_reduce_add_ps(a); }
  // 2^x for x <= 0 (see exp2_poly in flash_impl.h); lanes below -126 give exactly 0.
  static F exp2(F x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
    const F magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const F t = _mm512_add_ps(x, magic);
    const F f = _mm512_sub_ps(x, _mm512_sub_ps(t, magic));
    const F p = exp2_poly<VecAvx512>(f);
    const __m512i e = _mm512_slli_epi32(
        _mm512_add_epi32(_mm512_sub_epi32(_mm512_castps_si512(t), _mm512_castps_si512(magic)),
                         _mm512_set1_epi32(127)),
        23);
    const __mmask16 ok = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
    return _mm512_maskz_mul_ps(ok, p, _mm512_castsi512_ps(e));
  }
};
