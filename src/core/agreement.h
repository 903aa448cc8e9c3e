// Turning a control-plane Verdict into the one error every rank raises (internal).
#pragma once

#include <cstdint>
#include <string>

#include "comm/control_plane.h"
#include "common/strings.h"
#include "uaa/error.h"
#include "uaa/plan.h"

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

// A checkpoint inside a call: every rank waits for every other and learns whether one failed since
// the last one (`failure`: this rank's own problem, "" if none); throws the agreed error.
void checkpoint(ControlPlane& cp, const char* operation, std::uint64_t fingerprint, int rank,
                const std::string& failure = {}, ErrorCode code = ErrorCode::comm_failure);

// Runs a collective call; a transport error (timeout, comm_failure) it throws is rethrown with the
// plan it was running ("<operation> (plan <fingerprint>: P ranks, Sq q / Skv kv tokens): ...").
template <class Fn>
void with_plan_context(const char* operation, const Plan& plan, Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    if (e.code() != ErrorCode::timeout && e.code() != ErrorCode::comm_failure) throw;
    const std::string prefix = cat(operation, " (plan ");
    if (std::string(e.what()).find(prefix) != std::string::npos) throw;
    throw Error(e.code(), cat(prefix, std::hex, plan.fingerprint(), std::dec, ": ", plan.ranks(),
                              " ranks, ", plan.q_total(), " q / ", plan.kv_total(),
                              " kv tokens): ", e.what()));
  }
}

// A kernel variant's id for votes (stable per name; 0 is never used).
std::uint32_t kernel_vote_id(const char* kernel_name);

}  // namespace uaa::detail
