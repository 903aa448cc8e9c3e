#include "uaa/communicator.h"

#include <atomic>

#include "common/strings.h"
#include "uaa/error.h"

namespace uaa {

namespace {
std::atomic<std::uint64_t> next_communicator_id{1};
}

Communicator::Communicator() : id_(next_communicator_id.fetch_add(1)) {}

void Communicator::read_peers(std::span<const PeerRead> reads) {
  std::string first;
  if (!reads.empty())
    first = detail::cat(", the first from peer ", reads[0].peer);
  throw Error(ErrorCode::unsupported,
              detail::cat("uaa ", transport(), ": rank ", rank(), ": read_peers (", reads.size(),
                          " read(s)", first, "): this transport cannot read peers' memory "
                          "(can_read_peers() is false)"));
}

}  // namespace uaa
