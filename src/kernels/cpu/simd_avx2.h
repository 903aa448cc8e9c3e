// AVX2 + FMA vector operations for flash_impl.h (included inside an ISA namespace; no includes here).
struct VecAvx2 {
  using F = __m256;
  static constexpr int W = 8;
  static constexpr int kQkRows = 6, kQkCols = 2;  // 12 accumulators of 16 ymm
  static constexpr int kPvRows = 6, kPvCols = 2;
  static F zero() { return _mm256_setzero_ps(); }
  static F set1(float x) { return _mm256_set1_ps(x); }
  static F load(const float* p) { return _mm256_load_ps(p); }
  static F loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F x) { _mm256_store_ps(p, x); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F max(F a, F b) { return _mm256_max_ps(a, b); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float hmax(F a) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  static float hsum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static F exp2(F x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-150.0f));
    const F magic = _mm256_set1_ps(12582912.0f);
    const F t = _mm256_add_ps(x, magic);
    const F f = _mm256_sub_ps(x, _mm256_sub_ps(t, magic));
    const F p = exp2_poly<VecAvx2>(f);
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(t), _mm256_castps_si256(magic)),
                         _mm256_set1_epi32(127)),
        23);
    const F ok = _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_GE_OQ);
    return _mm256_and_ps(ok, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  }
};
