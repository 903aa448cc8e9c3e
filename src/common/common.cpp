#include "common/strings.h"
#include "uaa/error.h"
#include "uaa/types.h"

namespace uaa {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::invalid_argument: return "invalid_argument";
    case ErrorCode::mismatch: return "mismatch";
    case ErrorCode::unsupported: return "unsupported";
    case ErrorCode::comm_failure: return "comm_failure";
    case ErrorCode::timeout: return "timeout";
    case ErrorCode::internal: return "internal";
    case ErrorCode::out_of_memory: return "out_of_memory";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::f32: return 4;
    case DType::bf16: return 2;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
  }
  return "unknown";
}

namespace detail {

std::string list(const std::vector<std::int64_t>& values) {
  std::ostringstream os;
  os << '[';
  const std::size_t n = values.size();
  for (std::size_t i = 0; i < n; ++i) {
    if (n > 16 && i == 8) {
      os << "...(" << n - 12 << " more)...,";
      i = n - 4;
    }
    os << values[i] << (i + 1 < n ? "," : "");
  }
  os << ']';
  return os.str();
}

}  // namespace detail
}  // namespace uaa
