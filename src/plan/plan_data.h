// The immutable data behind uaa::Plan (internal).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "plan/layout.h"
#include "plan/strategy_layout.h"
#include "uaa/plan.h"

namespace uaa::detail {

struct PlanData {
  AttentionShape shape;  // normalized: kv_heads and scale filled in
  std::vector<std::int64_t> q_lens, kv_lens;
  Layout layout;          // uaa's (head ranges and counts; filled for every strategy)
  PaddedLayout padded;    // ulysses, ulysses_pad only
  GatherLayout gather;    // allgather_kv only
  std::uint64_t fingerprint = 0;
  std::uint64_t comm_id = 0;
  std::weak_ptr<Communicator> comm;  // lets forward() report a wrong communicator to the peers
};

}  // namespace uaa::detail
