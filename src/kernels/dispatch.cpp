// Chooses the attention kernel once per process: the first entry of the ordered list that this CPU
// and build support, unless UAA_KERNEL names one.
#include <cstdlib>
#include <cstring>
#include <string>

#include "kernels/kernel.h"
#include "uaa/attention.h"
#include "uaa/error.h"

namespace uaa::detail {
namespace {

const AttentionKernel& choose() {
  const AttentionKernel* const candidates[] = {&tiled_f32_kernel(), &reference_kernel()};
  if (const char* want = std::getenv("UAA_KERNEL"); want && *want) {
    if (std::strcmp(want, "reference") == 0) return reference_kernel();
    if (std::strcmp(want, "tiled") == 0) return tiled_f32_kernel();
    throw Error(ErrorCode::invalid_argument,
                std::string("UAA_KERNEL=") + want + " is not one of: reference, tiled");
  }
  return *candidates[0];
}

}  // namespace

const AttentionKernel& select_kernel() {
  static const AttentionKernel& k = choose();
  return k;
}

bool kernel_supports(DType dtype) { return select_kernel().supports(dtype); }

}  // namespace uaa::detail

namespace uaa {
const char* kernel_name() { return detail::select_kernel().name(); }
}  // namespace uaa
