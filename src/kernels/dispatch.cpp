// Chooses the attention kernel once per process: the first entry of the ordered list (best ISA
// first, the readable fallbacks last) that this CPU supports and UAA_ISA allows, unless UAA_KERNEL
// names one.
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/kernel.h"
#include "uaa/attention.h"
#include "uaa/error.h"

namespace uaa::detail {
namespace {

struct Variant {
  const char* isa;  // the UAA_ISA value that allows it and everything below it
  const AttentionKernel& (*kernel)();
  bool (*cpu_has)();
};

#if defined(__x86_64__)
bool has_avx512bf16() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx512bf16");
}
bool has_avx512() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("fma");
}
bool has_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool has_avx512bf16() { return false; }
bool has_avx512() { return false; }
bool has_avx2() { return false; }
#endif
bool always() { return true; }

// Best first.
const Variant kVariants[] = {
    {"avx512bf16", flash_avx512bf16_kernel, has_avx512bf16},
    {"avx512", flash_avx512_kernel, has_avx512},
    {"avx2", flash_avx2_kernel, has_avx2},
    {"portable", flash_portable_kernel, always},
};

const char* kIsaNames = "avx512bf16, avx512, avx2, portable";

// Index into kVariants of the best variant UAA_ISA allows (0 when unset).
std::size_t isa_cap() {
  const char* cap = std::getenv("UAA_ISA");
  if (!cap || !*cap) return 0;
  for (std::size_t i = 0; i < std::size(kVariants); ++i)
    if (std::strcmp(cap, kVariants[i].isa) == 0) return i;
  throw Error(ErrorCode::invalid_argument,
              std::string("UAA_ISA=") + cap + " is not one of: " + kIsaNames);
}

const AttentionKernel& best_flash() {
  for (std::size_t i = isa_cap(); i < std::size(kVariants); ++i)
    if (kVariants[i].cpu_has()) return kVariants[i].kernel();
  return flash_portable_kernel();
}

const AttentionKernel& choose() {
  const char* want = std::getenv("UAA_KERNEL");
  if (!want || !*want || std::strcmp(want, "flash") == 0) return best_flash();
  if (std::strcmp(want, "reference") == 0) return reference_kernel();
  if (std::strcmp(want, "tiled") == 0) return tiled_f32_kernel();
  std::string names = "reference, tiled, flash";
  for (const Variant& v : kVariants) {
    const AttentionKernel& k = v.kernel();
    if (std::strcmp(want, k.name()) == 0) {
      if (!v.cpu_has())
        throw Error(ErrorCode::unsupported,
                    std::string("UAA_KERNEL=") + want + ": this CPU lacks " + v.isa);
      return k;
    }
    names += std::string(", ") + k.name();
  }
  throw Error(ErrorCode::invalid_argument,
              std::string("UAA_KERNEL=") + want + " is not one of: " + names);
}

}  // namespace

std::span<const AttentionKernel* const> flash_kernels_supported() {
  static const std::vector<const AttentionKernel*> list = [] {
    std::vector<const AttentionKernel*> l;
    for (const Variant& v : kVariants)
      if (v.cpu_has()) l.push_back(&v.kernel());
    return l;
  }();
  return list;
}

const AttentionKernel& select_kernel() {
  static const AttentionKernel& k = choose();
  return k;
}

bool kernel_supports(DType dtype) { return select_kernel().supports(dtype); }

}  // namespace uaa::detail

namespace uaa {
const char* kernel_name() { return detail::select_kernel().name(); }
}  // namespace uaa
