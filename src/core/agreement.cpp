#include "core/agreement.h"

#include <cstring>

#include "common/strings.h"
#include "kernels/kernel.h"

namespace uaa::detail {

void raise_agreed_error(const Verdict& v, const VerdictChecks& c) {
  if (v.kind_min != v.kind_max)
    throw Error(ErrorCode::mismatch,
                cat(c.operation, ": ranks are in different operations on this communicator (",
                    vote_kind_name(static_cast<VoteKind>(v.kind_min)), " and ",
                    vote_kind_name(static_cast<VoteKind>(v.kind_max)),
                    "): every rank must make the same collective calls in the same order"));
  if (v.sequence_min != v.sequence_max)
    throw Error(ErrorCode::mismatch,
                cat(c.operation, ": ranks are out of step: rank ", v.sequence_max_rank,
                    " is at collective call ", v.sequence_max, " on this communicator, another rank at ",
                    v.sequence_min, " (a rank skipped or repeated a call)"));
  if (c.fingerprints && v.fingerprint_min != v.fingerprint_max)
    throw Error(ErrorCode::mismatch,
                cat(c.operation, ": ranks called with different plans: rank ", v.fingerprint_max_rank,
                    " has plan fingerprint ", std::hex, v.fingerprint_max, ", another rank ",
                    v.fingerprint_min));
  if (v.failed_count > 0) {
    std::string msg = v.message;
    if (v.failed_count > 1) msg += cat(" (and ", v.failed_count - 1, " more rank(s) failed)");
    throw Error(v.code, msg);
  }
  if (c.kernels && v.kernel_min != v.kernel_max)
    throw Error(ErrorCode::mismatch,
                cat(c.operation, ": ranks run different attention kernel variants (rank ",
                    v.kernel_max_rank, " differs from another rank; UAA_ISA or UAA_KERNEL set "
                    "differently?): results would not be bitwise identical to one rank. Use the "
                    "same kernel everywhere, or build the plan with PlanOptions::allow_mixed_kernels"));
}

void checkpoint(ControlPlane& cp, const char* operation, std::uint64_t fingerprint, int rank,
                const std::string& failure, ErrorCode code) {
  Vote v;
  v.kind = VoteKind::checkpoint;
  v.fingerprint = fingerprint;
  if (!failure.empty()) {
    v.failed = true;
    v.code = code;
    v.message = cat(operation, ": rank ", rank, ": ", failure);
  }
  raise_agreed_error(cp.agree(v), {operation, true, false});
}

std::uint32_t kernel_vote_id(const char* name) {
  std::uint32_t h = 2166136261u;  // FNV-1a of the name: the same on every rank for the same kernel
  for (const char* p = name; *p; ++p) h = (h ^ static_cast<unsigned char>(*p)) * 16777619u;
  return h == 0 ? 1 : h;
}

}  // namespace uaa::detail
