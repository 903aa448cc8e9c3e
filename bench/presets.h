// Workload presets of DESIGN.md §10 for `uaa bench` and `uaa plan`: heads, head dim and the image (or
// video) tokens to which a sweep of prompt lengths (--text-lens) is added; and document presets
// (packed documents of one sequence, `uaa plan --preset docs-longtail`, `uaa bench docs`), whose
// lengths come from a small integer-only generator below, so they are the same on every machine,
// compiler and standard library (no std:: distributions, no libm).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace uaa::bench {

struct Preset {
  const char* name;
  std::int64_t heads, kv_heads, head_dim, image_tokens;
  const char* what;
};

inline constexpr Preset kPresets[] = {
    {"flux", 24, 24, 128, 4096, "FLUX.1-dev 1024x1024 (3969 at 1008x1008)"},
    {"flux-1008", 24, 24, 128, 3969, "FLUX.1-dev 1008x1008"},
    {"qwen-image", 24, 24, 128, 6889, "Qwen-Image 1328x1328"},
    {"sd3", 24, 24, 64, 4096, "SD3-medium 1024x1024"},
    {"z-image", 30, 30, 128, 4096, "Z-Image 1024x1024 (30 heads)"},
    {"wan-480p", 40, 40, 128, 32760, "Wan2.1-14B 480p x 81 frames"},
    {"wan-720p", 40, 40, 128, 75600, "Wan2.1-14B 720p x 81 frames"},
};

// Packed documents of one sequence: `documents` lengths drawn from a log-normal distribution of
// spread sigma (natural log) and scaled to sum to exactly `total` tokens (see preset_documents).
struct DocPreset {
  const char* name;
  std::int64_t heads, kv_heads, head_dim;
  bool causal;
  int documents;
  std::int64_t total;
  int sigma_milli;     // sigma x 1000
  std::uint64_t seed;
  const char* what;
};

inline constexpr DocPreset kDocPresets[] = {
    {"docs-longtail", 32, 8, 128, true, 64, 32768, 1500, 1,
     "64 packed documents, log-normal lengths (sigma 1.5), 32768 tokens, GQA 32/8 x 128, causal"},
};

namespace detail_presets {

inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// 2^(k/16) for k = 0..16 in Q30 (round(2^(k/16) * 2^30)).
inline constexpr std::int64_t kExp2Sixteenths[17] = {
    1073741824, 1121280436, 1170923762, 1222764986, 1276901417, 1333434672,
    1392470869, 1454120821, 1518500250, 1585730000, 1655936265, 1729250827,
    1805811301, 1885761398, 1969251188, 2056437387, 2147483648};

}  // namespace detail_presets

// The document lengths of `p`, in order. Integer arithmetic only, so every platform gets the same
// list:
//   z        = (sum of 12 uniform 20-bit draws of splitmix64(seed)) / 2^20 - 6   (Irwin-Hall:
//              mean 0, variance 1, an approximately normal draw bounded by +-6)
//   raw      = 2^(16 + z * sigma / ln 2)   (1/ln 2 taken as 1477/1024; 2^x in Q20 fixed point:
//              shift by the integer part, the fraction from the 2^(k/16) table with linear
//              interpolation)
//   lengths  = raw * total / sum(raw), rounded down, the remaining tokens given one each to the
//              largest remainders (ties: lowest index); a length 0 is raised to 1 at the expense
//              of the longest document.
inline std::vector<std::int64_t> preset_documents(const DocPreset& p) {
  using namespace detail_presets;
  const int n = p.documents;
  std::vector<std::int64_t> len(static_cast<std::size_t>(n), 0);
  if (n <= 0) return len;
  std::uint64_t state = p.seed;
  const std::int64_t sigma_log2_q10 = static_cast<std::int64_t>(p.sigma_milli) * 1477 / 1024;
  std::vector<std::uint64_t> raw(static_cast<std::size_t>(n));
  unsigned __int128 sum = 0;
  for (int i = 0; i < n; ++i) {
    std::int64_t z = 0;  // Q20
    for (int k = 0; k < 12; ++k) z += static_cast<std::int64_t>(splitmix64(state) >> 44);
    z -= std::int64_t{6} << 20;
    // log2(raw) in Q20, shifted by 16 so that it stays positive for sigma up to ~2.4.
    const std::int64_t x =
        std::clamp<std::int64_t>(z * sigma_log2_q10 / 1024 + (std::int64_t{16} << 20), 0,
                                 (std::int64_t{40} << 20) - 1);
    const std::int64_t ip = x >> 20, f = x & ((1 << 20) - 1);
    const std::int64_t k = f >> 16, r = f & 0xffff;
    const std::int64_t m =
        kExp2Sixteenths[k] + (((kExp2Sixteenths[k + 1] - kExp2Sixteenths[k]) * r) >> 16);  // Q30
    raw[static_cast<std::size_t>(i)] = (static_cast<std::uint64_t>(m) << ip) >> 10;
    sum += raw[static_cast<std::size_t>(i)];
  }
  std::int64_t given = 0;
  std::vector<std::pair<unsigned __int128, int>> rest(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    const unsigned __int128 t = static_cast<unsigned __int128>(raw[static_cast<std::size_t>(i)]) *
                                static_cast<unsigned __int128>(p.total);
    len[static_cast<std::size_t>(i)] = static_cast<std::int64_t>(t / sum);
    given += len[static_cast<std::size_t>(i)];
    rest[static_cast<std::size_t>(i)] = {t % sum, i};
  }
  std::sort(rest.begin(), rest.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  for (std::int64_t j = 0; j < p.total - given; ++j) ++len[static_cast<std::size_t>(rest[static_cast<std::size_t>(j)].second)];
  for (std::int64_t& x : len)
    if (x == 0) {
      x = 1;
      --*std::max_element(len.begin(), len.end());
    }
  return len;
}

inline const Preset* find_preset(const std::string& name) {
  for (const Preset& p : kPresets)
    if (name == p.name) return &p;
  return nullptr;
}

inline const DocPreset* find_doc_preset(const std::string& name) {
  for (const DocPreset& p : kDocPresets)
    if (name == p.name) return &p;
  return nullptr;
}

inline std::string preset_names() {
  std::string s;
  for (const Preset& p : kPresets) s += (s.empty() ? "" : ", ") + std::string(p.name);
  for (const DocPreset& p : kDocPresets) s += ", " + std::string(p.name);
  return s;
}

}  // namespace uaa::bench
