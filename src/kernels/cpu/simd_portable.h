// Portable vector operations for flash_impl.h: GCC/Clang vector extensions, 4 lanes (SSE2 on
// x86-64, NEON on ARM), no FMA (a*b + c rounds twice; ISO mode keeps the compiler from contracting).
// Included inside an ISA namespace; no includes here.
struct VecPortable {
  typedef float F __attribute__((vector_size(16)));
  typedef int I __attribute__((vector_size(16)));
  static constexpr int W = 4;
  static constexpr int kQkRows = 6, kQkCols = 2;
  static constexpr int kPvRows = 6, kPvCols = 2;
  static F zero() { return F{0, 0, 0, 0}; }
  static F set1(float x) { return F{x, x, x, x}; }
  static F load(const float* p) {
    F r;
    __builtin_memcpy(&r, p, sizeof r);
    return r;
  }
  static F loadu(const float* p) { return load(p); }
  static void store(float* p, F x) { __builtin_memcpy(p, &x, sizeof x); }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F max(F a, F b) {  // like maxps: b when the comparison is false (NaN included)
    const I gt = a > b;
    return reinterpret_cast<F>((reinterpret_cast<I>(a) & gt) | (reinterpret_cast<I>(b) & ~gt));
  }
  static F fma(F a, F b, F c) { return a * b + c; }
  static float hmax(F a) {
    const float x = a[0] > a[2] ? a[0] : a[2], y = a[1] > a[3] ? a[1] : a[3];
    return x > y ? x : y;
  }
  static float hsum(F a) { return (a[0] + a[2]) + (a[1] + a[3]); }
  static F exp2(F x) {
    x = max(x, set1(-150.0f));
    const F magic = set1(12582912.0f);
    const F t = x + magic;
    const F f = x - (t - magic);
    const F p = exp2_poly<VecPortable>(f);
    const I e = ((reinterpret_cast<I>(t) - reinterpret_cast<I>(magic)) + 127) << 23;
    const I ok = x >= set1(-126.0f);
    return reinterpret_cast<F>(reinterpret_cast<I>(p * reinterpret_cast<F>(e)) & ok);
  }
};
