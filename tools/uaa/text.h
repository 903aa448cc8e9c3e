// String building for messages.
#pragma once

#include <sstream>
#include <string>

namespace uaa::cli {

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace uaa::cli
