// Flash attention, fp32 microkernels on VecAvx512 (-mavx512f -mavx512bw -mavx512dq -mavx512vl -mfma (set in CMakeLists.txt)). bf16 inputs are widened to fp32
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
namespace isa_avx512 {
#include "kernels/cpu/flash_math.h"
#include "kernels/cpu/simd_avx512.h"
#include "kernels/cpu/flash_impl.h"
#include "kernels/cpu/flash_bwd_impl.h"
}  // namespace isa_avx512

void run_avx512(const Problem& p) {
  isa_avx512::run_flash<isa_avx512::VecAvx512, isa_avx512::MicroF32<isa_avx512::VecAvx512>>(p);
}

void run_bwd_avx512(const BwdProblem& p) {
  isa_avx512::run_flash_bwd<isa_avx512::VecAvx512, isa_avx512::BwdMicroF32<isa_avx512::VecAvx512>>(p);
}

#else
// Not x86-64: never dispatched to (dispatch.cpp finds no avx512); keeps the link whole.
void run_avx512(const Problem& p) { run_portable(p); }
void run_bwd_avx512(const BwdProblem& p) { run_bwd_portable(p); }
#endif
}  // namespace uaa::detail::flash
