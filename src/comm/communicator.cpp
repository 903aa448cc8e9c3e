#include "uaa/communicator.h"

#include <atomic>
#include <vector>

#include "comm/control_plane.h"
#include "common/strings.h"
#include "uaa/error.h"

namespace uaa {

namespace {
std::atomic<std::uint64_t> next_communicator_id{1};
}

Communicator::Communicator() : id_(next_communicator_id.fetch_add(1)) {}

void Communicator::alltoallv(const void* send, std::span<const std::int64_t> send_counts,
                             std::span<const std::int64_t> send_displs, void* recv,
                             std::span<const std::int64_t> recv_counts,
                             std::span<const std::int64_t> recv_displs) {
  const int P = size();
  const std::size_t n = static_cast<std::size_t>(P);
  if (send_counts.size() < n || send_displs.size() < n || recv_counts.size() < n ||
      recv_displs.size() < n)
    throw Error(ErrorCode::invalid_argument,
                detail::cat("uaa ", transport(), ": rank ", rank(), ": alltoallv: counts and "
                            "displacements need ", P, " entries each (got ", send_counts.size(),
                            ", ", send_displs.size(), ", ", recv_counts.size(), ", ",
                            recv_displs.size(), ")"));
  // One message per peer with a non-empty block (0-byte messages are never sent); a null buffer
  // stays null so that exchange() names it.
  std::vector<Message> sends, recvs;
  sends.reserve(n);
  recvs.reserve(n);
  for (int j = 0; j < P; ++j) {
    const std::size_t k = static_cast<std::size_t>(j);
    if (send_counts[k] != 0)
      sends.push_back({j,
                       send ? const_cast<char*>(static_cast<const char*>(send)) + send_displs[k]
                            : nullptr,
                       send_counts[k]});
    if (recv_counts[k] != 0)
      recvs.push_back({j, recv ? static_cast<char*>(recv) + recv_displs[k] : nullptr,
                       recv_counts[k]});
  }
  exchange(sends, recvs);
}

void Communicator::read_peers(std::span<const PeerRead> reads) {
  std::string first;
  if (!reads.empty())
    first = detail::cat(", the first from peer ", reads[0].peer);
  throw Error(ErrorCode::unsupported,
              detail::cat("uaa ", transport(), ": rank ", rank(), ": read_peers (", reads.size(),
                          " read(s)", first, "): this transport cannot read peers' memory "
                          "(can_read_peers() is false)"));
}

void Communicator::write_peers(std::span<const PeerWrite> writes) {
  std::string first;
  if (!writes.empty())
    first = detail::cat(", the first to peer ", writes[0].peer);
  throw Error(ErrorCode::unsupported,
              detail::cat("uaa ", transport(), ": rank ", rank(), ": write_peers (", writes.size(),
                          " write(s)", first, "): this transport cannot write peers' memory "
                          "(can_read_peers() is false)"));
}

namespace detail {

const char* vote_kind_name(VoteKind k) {
  switch (k) {
    case VoteKind::plan_create: return "Plan::create";
    case VoteKind::forward: return "forward";
    case VoteKind::checkpoint: return "checkpoint";
    case VoteKind::tool: return "tool";
    case VoteKind::backward: return "backward";
  }
  return "unknown operation";
}

ControlPlane& control_plane(Communicator& comm) {
  if (auto* cp = dynamic_cast<ControlPlane*>(&comm)) return *cp;
  throw Error(ErrorCode::unsupported,
              cat("uaa ", comm.transport(), ": rank ", comm.rank(), ": the '", comm.transport(),
                  "' transport has no control plane (the agreement every collective call of uaa "
                  "opens with); use a transport that implements it, e.g. "
                  "uaa::make_mpi_communicator"));
}

}  // namespace detail

}  // namespace uaa
