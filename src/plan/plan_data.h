// The immutable data behind uaa::Plan (internal).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "plan/layout.h"
#include "program/program.h"
#include "uaa/error.h"
#include "uaa/plan.h"

namespace uaa::detail {

struct PlanData {
  AttentionShape shape;  // normalized: kv_heads and scale filled in
  PlanOptions options;
  int ranks = 0, rank = 0;
  std::vector<std::int64_t> q_lens, kv_lens;
  std::vector<std::int64_t> q_start, kv_start;  // prefix sums (size ranks + 1)
  Documents docs;  // normalized: kv filled in; one document of the totals when none were given
  std::vector<std::int64_t> q_doc_start, kv_doc_start;  // prefix sums; empty: one document
  std::vector<RankWork> work;  // uaa's split, per rank (filled for every strategy)
  Program forward;             // this rank's forward program for the plan's strategy
  // This rank's backward program (uaa strategy), compiled on first use: backward_program().
  mutable std::once_flag backward_once;
  mutable std::unique_ptr<const BackwardProgram> backward;
  std::uint64_t fingerprint = 0;
  std::shared_ptr<Communicator> comm;
  // A problem found on this rank only while building (Plan::from_lengths: e.g. this process's
  // kernel cannot run the dtype). The plan is then unusable and its first collective call reports
  // the problem on every rank through the agreement instead of leaving the peers waiting.
  bool failed = false;
  ErrorCode error_code = ErrorCode::internal;
  std::string error_message;
};

// The plan's backward program, compiled on first use (thread-safe; throws std::bad_alloc).
// Precondition: the uaa strategy.
const BackwardProgram& backward_program(const PlanData& plan);

// The generators' view of a plan.
Geometry geometry_of(const PlanData& plan);

// The data behind a plan (internal access; the public Plan exposes read-only properties).
const PlanData& plan_data(const Plan& plan);

}  // namespace uaa::detail
