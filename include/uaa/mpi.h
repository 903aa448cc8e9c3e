// uaa/mpi.h — the MPI transport.
//
//   MPI_Init(&argc, &argv);
//   std::shared_ptr<uaa::Communicator> comm = uaa::make_mpi_communicator(MPI_COMM_WORLD);
//
// make_mpi_communicator is collective over `comm`. It duplicates the caller's MPI_Comm twice
// (MPI_Comm_idup; uaa traffic never mixes with the caller's): one duplicate carries the bulk
// messages of exchange(), the other the control plane (agreements, allgather, failure notices).
// Both get MPI_ERRORS_RETURN so transport errors become uaa::Error. The communicator frees them
// when destroyed: destroy it before MPI_Finalize.
//
// Construction fails alike on every rank: a problem found on one rank (UAA_TIMEOUT_SECONDS or
// UAA_PEER_READS malformed, timeout_seconds NaN, max_count out of range or different from another
// rank's) is carried to every rank by the first agreement, and every rank throws the same
// uaa::Error(invalid_argument) naming the rank, the variable and its value, within seconds. (A rank
// whose own UAA_TIMEOUT_SECONDS is malformed waits the default deadline for the duplication.)
// A rank that never calls make_mpi_communicator makes the others throw ErrorCode::timeout when
// the deadline passes.
//
// Control plane: every collective call of uaa opens with an agreement of one 64-byte record per
// rank (recursive doubling: about log2(P) messages per rank; a second round of log2(P) messages of
// 1 KB only when some rank reports a failure). Messages of the exchange are point-to-point, matched
// in the order they are listed; a message to the rank itself is a memmove; 0-byte messages are
// skipped.
//
// Deadlines: every wait (agreement, allgather, exchange, the duplication) lasts at most
// `timeout_seconds` from the start of the operation (a rank waiting in a later round of an
// agreement gets a little grace, a quarter of the deadline, at most 5 s, per round, so that the
// rank next to a stopped one is the first to time out). A peer that never arrives (it crashed,
// skipped a call, or is blocked in another one) becomes uaa::Error(ErrorCode::timeout) naming the
// operation (and the agreement's round) and the ranks whose data never came.
//
// Failure notices: a rank that cannot finish a collective operation (its deadline passed, MPI
// reported an error, e.g. MPI_ERR_TRUNCATE in the middle of an exchange, or its exchange was
// malformed) sends its error to every other rank before it throws. Every rank waiting on that
// communicator (in any operation, or in its next one) then throws the same uaa::Error: the failing
// rank's code and message, so every rank reports the true culprit, promptly rather than at its own
// deadline. (A rank may see it from make_mpi_communicator itself if it is still finishing its last
// construction agreement when a faster rank already fails.)
//
// Poisoning: after a timeout, an MPI error or a notice, the communicator is *poisoned*: this rank's
// receives are cancelled, its sends get about a second to complete and are then released, but
// messages may still be in flight into or out of the buffers of the failed operation, so every
// later call on it (exchange, allgather, agree, read_peers, write_peers) throws
// ErrorCode::comm_failure. Keep those buffers alive, then MPI_Abort the job (or, if the peers are
// known to be alive, build a new communicator from a fresh MPI communicator). A poisoned
// communicator leaves its MPI_Comms and its internal buffers to MPI (never freed). See
// docs/FAILURE_MODEL.md.
//
// MPICH (4.0 at least) raises errors of request completion (MPI_Test*, MPI_Wait*) on
// MPI_COMM_WORLD's error handler rather than on the request's communicator's: with MPICH's default
// handler (MPI_ERRORS_ARE_FATAL) such an error aborts the job before uaa sees it. To get
// uaa::Error(comm_failure) and the notices instead, set MPI_ERRORS_RETURN on MPI_COMM_WORLD.
// Open MPI uses the communicator's handler. (Timeouts and notices work alike on both.)
//
// Peer access (Communicator::can_read_peers / read_peers / write_peers): when every rank of the
// communicator is on one node (the same host name and kernel boot id), the OS is Linux,
// MpiOptions::peer_reads is true and UAA_PEER_READS is not 0 on every rank, and a probe succeeds
// (at construction every rank reads a known 8-byte value from every rank, itself included, with
// process_vm_readv and checks it), then read_peers copies straight from a peer's memory with
// process_vm_readv and write_peers straight into it with process_vm_writev: one copy per byte, the
// same single-copy mechanism (cross-memory attach) that Open MPI's shared-memory transport uses.
// The decision is made once, collectively, in make_mpi_communicator and is identical on every rank
// (an all-gather of each rank's node, pid and probe, then agreements on the probe's verdicts, all
// under the deadline); it is never retried. Details:
//  - One rank: can_read_peers() is true when allowed (the probe reads this process's own value), so
//    that a caller's peer-access path runs on one rank too.
//  - read_peers and write_peers accept peer == rank(): the same system call, on this process; the
//    two regions of such an access must not overlap.
//  - Linux Yama: with /proc/sys/kernel/yama/ptrace_scope = 1, sibling processes may not access each
//    other's memory unless allowed; the constructor then calls prctl(PR_SET_PTRACER,
//    PR_SET_PTRACER_ANY) before the probe, which is what Open MPI's vader transport does itself
//    when it uses cross-memory attach (processes of other users stay excluded by the kernel's
//    uid checks). With ptrace_scope 2 or 3 the probe fails and can_read_peers() is false.
//  - Consecutive accesses of the same peer in one call share system calls (each call moves up to
//    IOV_MAX runs per side): order them by peer. No allocation after the first call.
//  - Every access of a call is checked before any byte is copied (invalid_argument naming the rank,
//    the access and the peer); an OS refusal is comm_failure. Neither poisons the communicator:
//    these calls are not collective.
//  - read_peers and write_peers, like every call, refuse a poisoned communicator (comm_failure).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <optional>

#include "uaa/communicator.h"

namespace uaa {

struct MpiOptions {
  // MPI takes `int` counts. Each message of an exchange is sent as point-to-point messages of at
  // most max_count elements (an element is gcd(4096, message bytes) bytes) addressed with 64-bit
  // offsets, so messages of any size move. Lower it only to test the multi-message path at small
  // sizes. Must be the same on every rank (else invalid_argument on every rank).
  std::int64_t max_count = 2147483647;

  // Deadline of every blocking operation, in seconds (see above). Unset: the environment variable
  // UAA_TIMEOUT_SECONDS if it is set, else kDefaultTimeoutSeconds. Zero, negative, infinite or more
  // than 1e9: wait forever (no deadline; failure notices still end a wait). NaN (or a malformed
  // UAA_TIMEOUT_SECONDS): ErrorCode::invalid_argument on every rank.
  std::optional<double> timeout_seconds = std::nullopt;
  static constexpr double kDefaultTimeoutSeconds = 300.0;

  // Use single-copy peer reads and writes when every rank is on one node and the OS allows it (see
  // above). The environment variable UAA_PEER_READS=0 disables them as well (1 or unset: as this
  // option says; any other value is ErrorCode::invalid_argument on every rank). Disabled on any
  // rank: disabled on all.
  bool peer_reads = true;
};

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const MpiOptions& options = {});

}  // namespace uaa
