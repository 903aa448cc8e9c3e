// uaa/communicator.h — the transport interface that algorithm code talks to.
//
// Two jobs: small host-side collectives (an all-gather for plans; the agreement that opens every
// call lives in the transport's internal control plane) and the bulk exchange of messages. Counts
// and displacements are 64-bit byte counts; an implementation must move messages of any size,
// including past 2^31 elements. Implementations: uaa/mpi.h (MPI). Algorithm code never names a
// transport.
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
// Copy of `from` (in this process) into `to` (in peer `peer`'s memory); both the same bytes().
struct PeerWrite {
  int peer = 0;
  StridedBytes from, to;
};
// One point-to-point message of an exchange: `bytes` contiguous bytes at `data`, to or from `peer`.
struct Message {
  int peer = 0;
  void* data = nullptr;  // a send's bytes are only read
  std::int64_t bytes = 0;
};

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* transport() const = 0;

  // Every rank contributes `bytes` bytes; `recv` receives size() * bytes, ordered by rank.
  virtual void allgather(const void* send, std::size_t bytes, void* recv) = 0;

  // Point-to-point exchange: posts every receive, then every send, and waits for all of them.
  // Messages between one pair of ranks are matched in the order they are listed (the receiver's
  // i-th message from j is the sender's i-th message to j; sizes must be equal). A message to or
  // from this rank itself is a local copy (listed in the same order on both sides). Any size,
  // including past 2^31 bytes.
  virtual void exchange(std::span<const Message> sends, std::span<const Message> recvs) = 0;

  // Uneven all-to-all over exchange(): peer j gets send[send_displs[j] .. + send_counts[j]) and
  // this rank receives peer j's block into recv[recv_displs[j] .. + recv_counts[j]). All values are
  // bytes, size() each.
  void alltoallv(const void* send, std::span<const std::int64_t> send_counts,
                 std::span<const std::int64_t> send_displs, void* recv,
                 std::span<const std::int64_t> recv_counts,
                 std::span<const std::int64_t> recv_displs);

  // Optional capability: single-copy reads of peers' memory (e.g. ranks on one node via Linux
  // cross-memory attach). Same answer on every rank of the communicator. Default: false.
  virtual bool can_read_peers() const { return false; }
  // Performs every read (not collective; the caller synchronizes with its peers so that the memory
  // read is ready and stays valid). Throws uaa::Error (unsupported when !can_read_peers();
  // invalid_argument for a malformed read; comm_failure when the OS refuses), naming this rank, the
  // peer and the values. Nothing is in flight afterwards, even after an error. Default: unsupported.
  virtual void read_peers(std::span<const PeerRead> reads);
  // The same for writes into peers' memory (can_read_peers() covers both directions).
  virtual void write_peers(std::span<const PeerWrite> writes);

  // Process-unique identity of this communicator object (plans remember which one built them).
  std::uint64_t id() const { return id_; }

 protected:
  Communicator();

 private:
  std::uint64_t id_;
};

}  // namespace uaa
