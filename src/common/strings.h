// Small string helpers for error messages.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace uaa::detail {

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

// "[1000,1001,0]"; long lists are shortened in the middle.
std::string list(const std::vector<std::int64_t>& values);

}  // namespace uaa::detail
