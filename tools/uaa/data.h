// Input data for `uaa run`: a deterministic generator and bf16 conversion.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace uaa::cli {

// kDout: the gradient of the output that `uaa run --backward` feeds to backward().
enum TensorId : int { kQ = 0, kK = 1, kV = 2, kDout = 3 };

// A value in [-1, 1) that depends only on (seed, tensor, global token, head, dim): every rank makes
// exactly its own shard, and any split of the tokens sees the same global tensors.
inline float generated_value(std::uint64_t seed, int tensor, std::int64_t token, std::int64_t head,
                             std::int64_t dim) {
  // Mix the coordinates one at a time through a splitmix64-style finalizer.
  auto mix = [](std::uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  std::uint64_t h = mix(seed + 0x9e3779b97f4a7c15ull);
  h = mix(h ^ (static_cast<std::uint64_t>(tensor) + 0x632be59bd9b4e019ull));
  h = mix(h ^ static_cast<std::uint64_t>(token));
  h = mix(h ^ (static_cast<std::uint64_t>(head) << 32) ^ static_cast<std::uint64_t>(dim));
  // 24 random bits -> k / 2^23 - 1 in [-1, 1), exactly representable in float.
  return static_cast<float>(static_cast<double>(h >> 40) * (1.0 / 8388608.0) - 1.0);
}

// Fills dst with tokens [first, first + tokens) of a [*][heads][dim] tensor.
inline void generate(std::uint64_t seed, int tensor, std::int64_t first, std::int64_t tokens,
                     std::int64_t heads, std::int64_t dim, float* dst) {
  std::size_t i = 0;
  for (std::int64_t t = 0; t < tokens; ++t)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t d = 0; d < dim; ++d) dst[i++] = generated_value(seed, tensor, first + t, h, d);
}



}  // namespace uaa::cli#include "uaa/bf16.h"

