#include "uaa/communicator.h"

#include <atomic>

namespace uaa {

namespace {
std::atomic<std::uint64_t> next_communicator_id{1};
}

Communicator::Communicator() : id_(next_communicator_id.fetch_add(1)) {}

}  // namespace uaa
