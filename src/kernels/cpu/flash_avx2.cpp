// Flash attention, fp32 microkernels on VecAvx2 (-mavx2 -mfma (set in CMakeLists.txt)). bf16 inputs are widened to fp32
// when packed. The algorithm is flash_impl.h; see flash_problem.h for why this unit is isolated.
#include <cstddef>
#include <cstdint>
#include <sched.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels/cpu/flash_problem.h"

namespace uaa::detail::flash {
#if defined(__x86_64__)
namespace isa_avx2 {
#include "kernels/cpu/flash_math.h"
#include "kernels/cpu/simd_avx2.h"
#include "kernels/cpu/flash_impl.h"
#include "kernels/cpu/flash_bwd_impl.h"
}  // namespace isa_avx2

void run_avx2(const Problem& p) {
  isa_avx2::run_flash<isa_avx2::VecAvx2, isa_avx2::MicroF32<isa_avx2::VecAvx2>>(p);
}

void run_bwd_avx2(const BwdProblem& p) {
  isa_avx2::run_flash_bwd<isa_avx2::VecAvx2, isa_avx2::BwdMicroF32<isa_avx2::VecAvx2>>(p);
}

#else
// Not x86-64: never dispatched to (dispatch.cpp finds no avx2); keeps the link whole.
void run_avx2(const Problem& p) { run_portable(p); }
void run_bwd_avx2(const BwdProblem& p) { run_bwd_portable(p); }
#endif
}  // namespace uaa::detail::flash
