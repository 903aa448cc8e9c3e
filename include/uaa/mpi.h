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
//
// Peer reads (Communicator::can_read_peers / read_peers): when every rank of the communicator is on
// one node (MPI_COMM_TYPE_SHARED), the OS is Linux, MpiOptions::peer_reads is true and
// UAA_PEER_READS is not 0 on every rank, and a probe succeeds (at construction every rank reads a
// known 8-byte value from every rank, itself included, with process_vm_readv and checks it), then
// read_peers copies straight from a peer's memory with process_vm_readv: one copy per byte, the
// same single-copy mechanism (cross-memory attach) that Open MPI's shared-memory transport uses.
// The decision is made once, collectively, in make_mpi_communicator and is identical on every rank
// (the verdicts are combined with MPI_Allreduce); it is never retried. Details:
//  - One rank: can_read_peers() is true when allowed (the probe reads this process's own value), so
//    that a caller's peer-read path runs on one rank too.
//  - read_peers accepts peer == rank(): the same process_vm_readv path, on this process; the two
//    regions of such a read must not overlap.
//  - Linux Yama: with /proc/sys/kernel/yama/ptrace_scope = 1, sibling processes may not read each
//    other's memory unless allowed; the constructor then calls prctl(PR_SET_PTRACER,
//    PR_SET_PTRACER_ANY) before the probe, which is what Open MPI's vader transport does itself
//    when it uses cross-memory attach (processes of other users stay excluded by the kernel's
//    uid checks). With ptrace_scope 2 or 3 the probe fails and can_read_peers() is false.
//  - Consecutive reads of the same peer in one read_peers call share system calls (each call moves
//    up to IOV_MAX runs per side): order the reads by peer. No allocation after the first call.
//  - read_peers, like every call, refuses a poisoned communicator (comm_failure).
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

  // Use single-copy peer reads when every rank is on one node and the OS allows it (see above).
  // The environment variable UAA_PEER_READS=0 disables them as well (1 or unset: as this option
  // says; any other value is ErrorCode::invalid_argument). Disabled on any rank: disabled on all.
  bool peer_reads = true;
};

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const MpiOptions& options = {});

}  // namespace uaa
