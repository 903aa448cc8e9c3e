// Deterministic test data: every element is a formula of (seed, tensor, global token, head, dim), so
// each rank can make exactly its own shard and a misrouted element is caught.
#pragma once

#include <cstdint>
#include <vector>

namespace uaa::test {

// A value in [-1, 1) from a 64-bit mix of the coordinates (splitmix64).
inline float element(std::uint64_t seed, int tensor, std::int64_t token, std::int64_t head,
                     std::int64_t d) {
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ull + static_cast<std::uint64_t>(tensor) * 0xbf58476d1ce4e5b9ull +
                    static_cast<std::uint64_t>(token) * 0x94d049bb133111ebull +
                    static_cast<std::uint64_t>(head) * 0x2545f4914f6cdd1dull + static_cast<std::uint64_t>(d);
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  x ^= x >> 31;
  return static_cast<float>(static_cast<double>(x >> 40) / static_cast<double>(1ull << 23) - 1.0);
}

// Contiguous [tokens][heads][dim] slice starting at global token `first`.
inline std::vector<float> make_tensor(std::uint64_t seed, int tensor, std::int64_t first,
                                      std::int64_t tokens, std::int64_t heads, std::int64_t dim) {
  std::vector<float> out(static_cast<std::size_t>(tokens * heads * dim));
  std::size_t i = 0;
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t d = 0; d < dim; ++d) out[i++] = element(seed, tensor, first + t, h, d);
  return out;
}

}  // namespace uaa::test
