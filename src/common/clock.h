// Wall-clock phase timing shared by the calls (internal).
#pragma once

#include <chrono>

namespace uaa::detail {

using Clock = std::chrono::steady_clock;
inline double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

}  // namespace uaa::detail
