// uaa/mpi.h — the MPI transport.
//
//   MPI_Init(&argc, &argv);
//   std::shared_ptr<uaa::Communicator> comm = uaa::make_mpi_communicator(MPI_COMM_WORLD);
//
// The communicator duplicates the caller's MPI_Comm (uaa traffic never mixes with the caller's) and
// sets MPI_ERRORS_RETURN on the duplicate so transport errors become uaa::Error. It frees the
// duplicate when destroyed: destroy it before MPI_Finalize.
//
// Deadlines: every blocking exchange (allgather, alltoallv) waits at most `timeout_seconds`. A peer
// that never arrives (it crashed, skipped a call, or is blocked in another one) becomes
// uaa::Error(ErrorCode::timeout) on the ranks that wait, naming the operation and the ranks whose
// data never came. After a timeout the communicator is *poisoned*: messages may still be in flight
// into or out of the buffers of the failed exchange, so every later call on it throws
// ErrorCode::comm_failure. Keep those buffers alive, then MPI_Abort the job (or, if the peers are
// known to be alive, build a new communicator from a fresh MPI communicator). See
// docs/FAILURE_MODEL.md.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <optional>

#include "uaa/communicator.h"

namespace uaa {

struct MpiOptions {
  // MPI takes `int` counts. Each peer's block is sent as point-to-point messages of at most
  // max_count elements (an element is gcd(4096, block bytes) bytes) addressed with 64-bit offsets,
  // so blocks of any size move. Lower it only to test the multi-message path at small sizes.
  std::int64_t max_count = 2147483647;

  // Deadline of every blocking exchange, in seconds. Unset: the environment variable
  // UAA_TIMEOUT_SECONDS if it is set, else kDefaultTimeoutSeconds. Zero, negative or infinite: wait
  // forever (no deadline).
  std::optional<double> timeout_seconds = std::nullopt;
  static constexpr double kDefaultTimeoutSeconds = 300.0;
};

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const MpiOptions& options = {});

}  // namespace uaa
