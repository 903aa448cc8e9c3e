// The data behind uaa::SavedForward (internal).
#pragma once

#include <cstdint>

#include "core/workspace.h"
#include "uaa/backward.h"

namespace uaa::detail {

struct SavedData {
  AlignedBuffer buffer;           // the forward's stage_in: q/k/v rows received from other ranks
  std::uint64_t fingerprint = 0;  // plan of the forward that filled it
  bool valid = false;             // that forward completed (every rank passed its last step)
};

}  // namespace uaa::detail
