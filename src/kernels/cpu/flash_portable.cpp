// Flash attention, fp32 microkernels on VecPortable (baseline flags). bf16 inputs are widened to fp32
// when packed. The algorithm is flash_impl.h; see flash_problem.h for why this unit is isolated.
#include <cstddef>
#include <cstdint>
#include <sched.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels/cpu/flash_problem.h"

namespace uaa::detail::flash {
namespace isa_portable {
#include "kernels/cpu/flash_math.h"
#include "kernels/cpu/simd_portable.h"
#include "kernels/cpu/flash_impl.h"
#include "kernels/cpu/flash_bwd_impl.h"
}  // namespace isa_portable

void run_portable(const Problem& p) {
  isa_portable::run_flash<isa_portable::VecPortable, isa_portable::MicroF32<isa_portable::VecPortable>>(p);
}

void run_bwd_portable(const BwdProblem& p) {
  isa_portable::run_flash_bwd<isa_portable::VecPortable, isa_portable::BwdMicroF32<isa_portable::VecPortable>>(p);
}

}  // namespace uaa::detail::flash
