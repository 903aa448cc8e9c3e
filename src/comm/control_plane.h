// The control plane (internal): how ranks agree, separate from the bulk data.
//
// Every collective operation of uaa (Plan::create, each forward() call) opens with an agreement:
// each rank contributes a Vote (what it is about to do, its verdict on its own arguments and
// set-up), and every rank gets the same Verdict back. On success that costs O(log P) messages of
// 64 bytes per rank (recursive doubling); only when some rank failed does a second O(log P) round
// fetch the lowest failing rank's error code and message. Ranks then raise the same error, or
// proceed together.
//
// Failures after an agreement (an MPI error mid-exchange, a deadline passed) cannot wait for the
// next agreement: the transport that detects one sends a failure notice to every rank (O(P)
// messages, on failure only) and poisons the communicator; every rank blocked in any wait of that
// communicator stops with the same uaa::Error (the failing rank's code and message).
//
// Transports implement ControlPlane next to Communicator; algorithm code reaches it through
// control_plane(comm).
#pragma once

#include <cstdint>
#include <string>

#include "uaa/communicator.h"
#include "uaa/error.h"

namespace uaa::detail {

// Which operation a vote belongs to: ranks in different operations must not agree.
enum class VoteKind : std::uint8_t { plan_create = 1, forward = 2, checkpoint = 3, tool = 4, backward = 5 };
const char* vote_kind_name(VoteKind k);

struct Vote {
  VoteKind kind = VoteKind::forward;
  std::uint64_t fingerprint = 0;  // of the plan (or options) the rank calls with
  std::uint32_t kernel = 0;       // kernel variant id of this process (0: not relevant)
  std::uint16_t flags = 0;        // OR-combined over ranks (e.g. "republish staging addresses")
  bool failed = false;            // this rank cannot go on
  ErrorCode code = ErrorCode::internal;  // when failed
  std::string message;                   // when failed: names this rank and what went wrong
};

// The combination of every rank's vote; identical on every rank.
struct Verdict {
  std::uint8_t kind_min = 0, kind_max = 0;
  std::uint64_t fingerprint_min = 0, fingerprint_max = 0;
  int fingerprint_max_rank = 0;  // lowest rank voting fingerprint_max
  std::uint64_t sequence_min = 0, sequence_max = 0;  // agreements each rank made on this communicator
  int sequence_max_rank = 0;
  std::uint32_t kernel_min = 0, kernel_max = 0;
  int kernel_max_rank = 0;
  std::uint16_t flags = 0;
  int failed_count = 0;
  int first_failed_rank = -1;        // lowest failing rank, -1 if none
  ErrorCode code = ErrorCode::internal;  // that rank's code and message (second round)
  std::string message;
};

class ControlPlane {
 public:
  virtual ~ControlPlane() = default;
  // Collective, under the communicator's deadline (timeout: notices to every rank, poisoned).
  virtual Verdict agree(const Vote& mine) = 0;
  // Agreements made so far on this communicator (the next one's sequence number).
  virtual std::uint64_t agreements() const = 0;
};

// The control plane of `comm`; throws ErrorCode::unsupported if its transport has none.
ControlPlane& control_plane(Communicator& comm);

}  // namespace uaa::detail
