// Workload presets of DESIGN.md §10 for `uaa bench` and `uaa plan`: heads, head dim and the image (or
// video) tokens to which a sweep of prompt lengths (--text-lens) is added.
#pragma once

#include <cstdint>
#include <string>

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

inline const Preset* find_preset(const std::string& name) {
  for (const Preset& p : kPresets)
    if (name == p.name) return &p;
  return nullptr;
}

inline std::string preset_names() {
  std::string s;
  for (const Preset& p : kPresets) s += (s.empty() ? "" : ", ") + std::string(p.name);
  return s;
}

}  // namespace uaa::bench
