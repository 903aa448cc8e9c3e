// Small helpers shared by the benchmarks (bench_strategies.cpp, bench_docs.cpp, sweep.cpp).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace uaa::bench {

using Clock = std::chrono::steady_clock;
inline double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// A value in [-1, 1) from the global coordinates: any split sees the same global tensors.
inline float value_at(int tensor, std::int64_t token, std::int64_t head, std::int64_t dim) {
  std::uint64_t z = (static_cast<std::uint64_t>(tensor) << 60) ^ (static_cast<std::uint64_t>(token) << 24) ^
                    (static_cast<std::uint64_t>(head) << 12) ^ static_cast<std::uint64_t>(dim);
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<double>(z >> 40) * (1.0 / 8388608.0) - 1.0);
}

inline std::int64_t sum(const std::vector<std::int64_t>& v) {
  std::int64_t s = 0;
  for (std::int64_t x : v) s += x;
  return s;
}

// A JSON number ("null" when not finite).
inline std::string num(double v) {
  if (!std::isfinite(v)) return "null";
  char b[32];
  std::snprintf(b, sizeof b, "%.6g", v);
  return b;
}

}  // namespace uaa::bench
