// Scalar helpers shared by the flash kernels (included inside an ISA namespace; no includes here).
// The bf16 conversions repeat uaa/bf16.h on purpose: per-ISA units share no inline functions with
// the rest of the library (see flash_problem.h), so the linker cannot pick an AVX-512 copy for a
// baseline caller.

// 2^f for f in [-0.5, 0.5]: Taylor series of e^(f ln 2) to degree 7. The first omitted term is
// below 5.3e-9 relative, under half an fp32 ulp, so the polynomial error is dominated by rounding.
template <class V>
inline typename V::F exp2_poly(typename V::F f) {
  typename V::F p = V::set1(1.525273380405984e-05f);
  p = V::fma(p, f, V::set1(1.5403530393381606e-04f));
  p = V::fma(p, f, V::set1(1.3333558146428443e-03f));
  p = V::fma(p, f, V::set1(9.618129107628477e-03f));
  p = V::fma(p, f, V::set1(5.550410866482158e-02f));
  p = V::fma(p, f, V::set1(2.402265069591007e-01f));
  p = V::fma(p, f, V::set1(6.931471805599453e-01f));
  return V::fma(p, f, V::set1(1.0f));
}

inline float f32_from_bf16(std::uint16_t b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even; NaN stays a (quiet) NaN.
inline std::uint16_t bf16_from_f32(float f) {
  std::uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}
