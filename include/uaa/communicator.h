// uaa/communicator.h — the transport interface that algorithm code talks to.
//
// Two jobs: a small host-side all-gather (plans use it once) and the bulk uneven exchange (every call
// uses it twice). Counts and displacements are 64-bit byte counts; an implementation must move
// messages of any size, including past 2^31 elements. Implementations: uaa/mpi.h (MPI). Algorithm
// code never names a transport.
//
// Thread safety: a communicator serves one collective at a time; calls on one communicator from
// several threads must be serialized by the caller (as with MPI communicators).
#pragma once

#include <cstdint>
#include <memory>
#include <span>

namespace uaa {

// A strided region of bytes in one process: n0 blocks s0 bytes apart, each block n1 runs s1 bytes
// apart, each run `run` contiguous bytes. Bytes are visited block by block, run by run.
struct StridedBytes {
  std::uintptr_t address = 0;
  std::int64_t n0 = 1, s0 = 0, n1 = 1, s1 = 0, run = 0;
  std::int64_t bytes() const { return n0 * n1 * run; }
};
// Copy of `from` (in peer `peer`'s memory) into `to` (in this process); both the same bytes().
struct PeerRead {
  int peer = 0;
  StridedBytes from, to;
};

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* transport() const = 0;

  // Every rank contributes `bytes` bytes; `recv` receives size() * bytes, ordered by rank.
  virtual void allgather(const void* send, std::size_t bytes, void* recv) = 0;

  // Uneven all-to-all. Peer j gets send[send_displs[j] .. + send_counts[j]) and this rank receives
  // peer j's block into recv[recv_displs[j] .. + recv_counts[j]). All values are bytes, size() each.
  // `max_total_bytes` is the largest send or receive buffer of any rank in this exchange, identical
  // on every rank (plans know it): a transport that picks an algorithm by size must pick by this
  // number, so that all ranks agree without asking. (The MPI transport, always point-to-point, only
  // names it in its timeout message.)
  virtual void alltoallv(const void* send, std::span<const std::int64_t> send_counts,
                         std::span<const std::int64_t> send_displs, void* recv,
                         std::span<const std::int64_t> recv_counts,
                         std::span<const std::int64_t> recv_displs,
                         std::int64_t max_total_bytes) = 0;

  // Optional capability: single-copy reads of peers' memory (e.g. ranks on one node via Linux
  // cross-memory attach). Same answer on every rank of the communicator. Default: false.
  virtual bool can_read_peers() const { return false; }
  // Performs every read (not collective; the caller synchronizes with its peers, e.g. with
  // allgather, so that the memory read is ready and stays valid). Throws uaa::Error
  // (unsupported when !can_read_peers(); invalid_argument for a malformed read; comm_failure
  // when the OS refuses), naming this rank, the peer and the values. Default: throws unsupported.
  virtual void read_peers(std::span<const PeerRead> reads);

  // Process-unique identity of this communicator object (plans remember which one built them).
  std::uint64_t id() const { return id_; }

  // Number of forward() calls issued on this communicator so far; checked at each call so that
  // ranks that lost step with each other fail instead of mixing data.
  std::uint64_t next_call_index() { return call_index_++; }

 protected:
  Communicator();

 private:
  std::uint64_t id_;
  std::uint64_t call_index_ = 0;
};

}  // namespace uaa
