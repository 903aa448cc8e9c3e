// Input data for `uaa run`: a deterministic generator, and the masks --check's reference runs.
#pragma once

#include <algorithm>
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

// --check's float64 reference of query rows [a, b) of one document (q_len queries, kv_len keys,
// positions counted from the document's start) under the mask of uaa/plan.h: query i sees key j iff
// i' - window_left <= j <= i' + right with i' = i + kv_len - q_len, right = causal ? 0 :
// window_right, -1 meaning no bound. uaa::detail::reference_attention(_backward) aligns its mask
// to the bottom right of the rows and keys it is given, so the rows [a, b) alone are passed with
// the keys [key_first, key_first + keys) they can see and the window sides shifted to keep every
// row's visible keys. Fields as passed: causal = false (the cap is in window_right).
struct ReferenceWindow {
  std::int64_t key_first = 0, keys = 0;
  std::int64_t window_left = -1, window_right = -1;
};
inline ReferenceWindow reference_window(std::int64_t a, std::int64_t b, std::int64_t q_len,
                                        std::int64_t kv_len, bool causal, std::int64_t window_left,
                                        std::int64_t window_right) {
  const std::int64_t c = kv_len - q_len;  // aligned position of a row = row + c
  const std::int64_t right = causal ? 0 : window_right;
  auto clamp = [&](std::int64_t x) { return std::min(std::max<std::int64_t>(x, 0), kv_len); };
  // One past the last key row b - 1 sees; the first key row a sees.
  const std::int64_t hi = right < 0 ? kv_len : clamp(c + b + right);
  const std::int64_t lo = window_left < 0 ? 0 : clamp(a + c - window_left);
  ReferenceWindow w;
  w.key_first = lo;
  if (hi <= lo || b <= a) return w;  // no row sees a key
  w.keys = hi - lo;
  // The reference aligns row i at (i - a) + (hi - lo) - (b - a) in the keys from lo; the true
  // aligned position there is i + c - lo: s more.
  const std::int64_t s = c - hi + b;
  w.window_left = window_left < 0 ? -1 : window_left - s;   // >= 0 (hi <= c + b + right, kv_len)
  w.window_right = right < 0 ? -1 : right + s;              // >= 0 (hi clamped at kv_len or exact)
  return w;
}

}  // namespace uaa::cli
