// uaa/bf16.h — conversion between float and bfloat16 storage (the DType::bf16 element).
//
//   std::vector<std::uint16_t> q16(q.size());
//   for (std::size_t i = 0; i < q.size(); ++i) q16[i] = uaa::bf16_from_f32(q[i]);
//   args.q = uaa::contiguous(q16.data(), tokens, heads, head_dim, uaa::DType::bf16);
#pragma once

#include <cstdint>
#include <cstring>

namespace uaa {

// Round to nearest, ties to even; NaN stays a (quiet) NaN, ±Inf stays ±Inf.
inline std::uint16_t bf16_from_f32(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

// Exact.
inline float f32_from_bf16(std::uint16_t b) {
  const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

}  // namespace uaa
