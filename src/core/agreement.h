// Turning a control-plane Verdict into the one error every rank raises (internal).
#pragma once

#include "comm/control_plane.h"

namespace uaa::detail {

struct VerdictChecks {
  const char* operation = "";        // "uaa::forward", "uaa::Plan::create", ...
  bool fingerprints = true;          // ranks must vote the same fingerprint (same plan)
  bool kernels = true;               // ranks must run the same kernel variant
};

// Throws the error the verdict implies, identically on every rank (the verdict is identical):
// ranks in different operations or out of step, different plans, different kernel variants
// (ErrorCode::mismatch), else the lowest failing rank's own error. Returns when all agree.
void raise_agreed_error(const Verdict& v, const VerdictChecks& checks);

// A kernel variant's id for votes (stable per name; 0 is never used).
std::uint32_t kernel_vote_id(const char* kernel_name);

}  // namespace uaa::detail
