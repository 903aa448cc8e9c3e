// Workspace buffers (internal): sized before a call's agreement, reused afterwards.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#include "kernels/kernel.h"
#include "uaa/attention.h"
#include "uaa/communicator.h"

namespace uaa {

// A 64-byte aligned, zero-initialized byte buffer that only grows.
class AlignedBuffer {
 public:
  // Returns true if it had to allocate. Throws std::bad_alloc when the memory is not there.
  bool reserve(std::int64_t bytes) {
    if (bytes <= size_) return false;
    const std::size_t n = (static_cast<std::size_t>(bytes) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, n);
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, n);  // touch every page now (overcommit), and padding bytes stay defined
    data_.reset(static_cast<std::byte*>(p));
    size_ = static_cast<std::int64_t>(n);
    return true;
  }
  std::byte* data() { return data_.get(); }
  const std::byte* data() const { return data_.get(); }
  std::int64_t size() const { return size_; }

 private:
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte[], Free> data_;
  std::int64_t size_ = 0;
};

namespace detail {

struct WorkspaceBuffers {
  // Staging named by programs, and the message executor's pack/unpack areas.
  AlignedBuffer stage_in, stage_out, pack, unpack, scratch;
  // Backward: the forward's q/k/v rows again (recompute mode) and this rank's delta rows.
  AlignedBuffer recompute, delta;
  // Per-call lists, kept so that steady-state calls do not allocate.
  std::vector<Message> sends, recvs;
  std::vector<std::uint32_t> unpack_parts;  // recv parts that arrive in `unpack`
  std::vector<std::int64_t> unpack_offsets;
  std::vector<PeerRead> reads;
  std::vector<PeerWrite> writes;
  std::vector<detail::TokenSegment> qseg, kseg, vseg;
  std::vector<detail::OutSegment> oseg;
  std::vector<detail::TokenSegment> dout_seg;
  std::vector<detail::StatSegment> lse_seg, delta_seg;
  std::vector<std::uint64_t> gather;  // all-gather scratch
  // Peer-memory executor: every rank's staging addresses as last published through this workspace.
  std::vector<std::uint64_t> peer_stage_in, peer_stage_out;
  std::uint64_t published_comm = 0;      // communicator id of that publication (0: none)
  std::uint64_t published_sequence = 0;  // the agreement it followed
  std::byte* published_in = nullptr;     // this rank's bases when published
  std::byte* published_out = nullptr;
  bool last_peer_memory = false;  // what the last call used (CallReport)
  std::int64_t grows = 0;
  void reserve(AlignedBuffer& b, std::int64_t bytes) { grows += b.reserve(bytes) ? 1 : 0; }
};

}  // namespace detail
}  // namespace uaa
