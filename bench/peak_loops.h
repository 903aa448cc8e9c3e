// The ISA loops of peak.cpp, one translation unit each (per-file ISA flags, bench/CMakeLists.txt).
// Each runs `iters` iterations of its instruction on every accumulator and returns a value of the
// accumulators (so the work is not dropped). Call one only when the CPU has its ISA.
#pragma once

#include <cstdint>

namespace uaa::bench {

inline constexpr double kFlopsPerIterFmaAvx512 = 16 * 32;     // 16 zmm FMAs × 16 lanes × 2
inline constexpr double kFlopsPerIterFmaAvx2 = 12 * 16;       // 12 ymm FMAs × 8 lanes × 2
inline constexpr double kFlopsPerIterDpbf16Avx512 = 16 * 64;  // 16 vdpbf16ps × 16 lanes × 4

float peak_loop_fma_avx512(std::int64_t iters);
float peak_loop_fma_avx2(std::int64_t iters);
float peak_loop_dpbf16_avx512(std::int64_t iters);

}  // namespace uaa::bench
