// Test data shared by the kernel tests (flash_kernel_test.cpp, flash_backward_test.cpp): a tensor in
// fp32 and bf16 form, its copy into dense or head-major padded storage, segment cuts.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/test_data.h"
#include "uaa/bf16.h"
#include "uaa/types.h"

namespace uaa::detail::kernel_test {

inline float round_bf16(float f) { return uaa::f32_from_bf16(uaa::bf16_from_f32(f)); }

// One tensor in both forms: fp32 values (bf16-representable when dtype is bf16) and raw storage.
struct Tensor3 {
  std::int64_t S, H, D;
  std::vector<float> f;          // token-major contiguous values
  std::vector<std::uint16_t> b;  // the same values as bf16 bits (bf16 only)
};

inline Tensor3 make(std::uint64_t seed, int id, std::int64_t S, std::int64_t H, std::int64_t D, DType dt) {
  Tensor3 t{S, H, D, test::make_tensor(seed, id, 0, S, H, D), {}};
  if (dt == DType::bf16) {
    t.b.resize(t.f.size());
    for (std::size_t i = 0; i < t.f.size(); ++i) {
      t.b[i] = uaa::bf16_from_f32(t.f[i]);
      t.f[i] = uaa::f32_from_bf16(t.b[i]);
    }
  }
  return t;
}

// Copies a token-major tensor into the requested storage; returns strides in elements.
struct Stored {
  std::vector<float> f;
  std::vector<std::uint16_t> b;
  std::int64_t ts, hs;
  const void* base(DType dt) const { return dt == DType::bf16 ? static_cast<const void*>(b.data()) : f.data(); }
};

inline Stored store(const Tensor3& t, DType dt, bool head_major) {
  Stored s;
  const std::int64_t pad = head_major ? 3 : 0;
  s.ts = head_major ? t.D + pad : t.H * t.D;
  s.hs = head_major ? t.S * (t.D + pad) : t.D;
  const std::size_t n = static_cast<std::size_t>(std::max<std::int64_t>(1, t.S * t.H * (t.D + pad)));
  s.f.assign(n, std::nanf(""));  // padding is NaN: reading it would show
  s.b.assign(n, 0x7fc1);
  for (std::int64_t i = 0; i < t.S; ++i)
    for (std::int64_t h = 0; h < t.H; ++h)
      for (std::int64_t d = 0; d < t.D; ++d) {
        const std::size_t src = static_cast<std::size_t>((i * t.H + h) * t.D + d);
        const std::size_t dst = static_cast<std::size_t>(i * s.ts + h * s.hs + d);
        if (dt == DType::bf16)
          s.b[dst] = t.b[src];
        else
          s.f[dst] = t.f[src];
      }
  return s;
}

// Sliding windows (left, right; -1 unbounded) the tests run, each with and without causal: one key,
// one key back, small and asymmetric, about a key tile each side, left only, right only, and wider
// than the shorter test sequences.
struct Window {
  std::int64_t left, right;
};
inline constexpr Window kWindows[] = {{0, 0}, {1, 0}, {5, 3}, {63, 64}, {100, -1}, {-1, 7}, {200, 200}};

// A mask: causal or not, with a window (or none: {-1, -1}).
struct Mask {
  bool causal;
  Window window{-1, -1};
};
// Every window with and without causal, after the two plain masks (none, causal).
inline std::vector<Mask> masks_with_windows() {
  std::vector<Mask> m{{false}, {true}};
  for (bool causal : {false, true})
    for (Window w : kWindows) m.push_back({causal, w});
  return m;
}

inline std::string window_str(std::int64_t left, std::int64_t right) {
  if (left < 0 && right < 0) return "";
  return " window=(" + std::to_string(left) + "," + std::to_string(right) + ")";
}

inline std::vector<std::int64_t> cuts_or_whole(const std::vector<std::int64_t>& cuts, std::int64_t total) {
  return cuts.empty() ? std::vector<std::int64_t>{total} : cuts;
}

}  // namespace uaa::detail::kernel_test
