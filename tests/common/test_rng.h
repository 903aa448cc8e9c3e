// A tiny deterministic generator for test parameters (lengths, shapes). Its output is fixed by the
// seed alone (no library-defined distributions), so every MPI rank draws exactly the same values.
#pragma once

#include <cstddef>
#include <cstdint>

namespace uaa::test {

class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}

  std::uint64_t next() {  // splitmix64
    std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [lo, hi] (the modulo bias is irrelevant for test parameters).
  std::int64_t uniform(std::int64_t lo, std::int64_t hi) {
    return lo + static_cast<std::int64_t>(next() % static_cast<std::uint64_t>(hi - lo + 1));
  }
  template <typename T, std::size_t N>
  const T& pick(const T (&values)[N]) {
    return values[next() % N];
  }

 private:
  std::uint64_t state_;
};

}  // namespace uaa::test
