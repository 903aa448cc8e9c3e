// Workspace buffers (internal): grown on first use with a plan, reused afterwards.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <memory>

#include <vector>

#include "kernels/kernel.h"
#include "uaa/attention.h"

namespace uaa {

// A 64-byte aligned, zero-initialized byte buffer that only grows.
class AlignedBuffer {
 public:
  // Returns true if it had to allocate.
  bool reserve(std::int64_t bytes) {
    if (bytes <= size_) return false;
    const std::size_t n = (static_cast<std::size_t>(bytes) + 63) / 64 * 64;
    void* p = std::aligned_alloc(64, n);
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, n);  // padding bytes travel too: keep them defined
    data_.reset(static_cast<std::byte*>(p));
    size_ = static_cast<std::int64_t>(n);
    return true;
  }
  std::byte* data() { return data_.get(); }
  std::int64_t size() const { return size_; }

 private:
  struct Free {
    void operator()(std::byte* p) const { std::free(p); }
  };
  std::unique_ptr<std::byte[], Free> data_;
  std::int64_t size_ = 0;
};

struct Workspace::Buffers {
  AlignedBuffer headers, qkv_send, qkv_recv, out_send, out_recv, scratch, sync;
  std::vector<detail::TokenSegment> qseg, kseg, vseg;
  std::vector<detail::OutSegment> oseg;
  std::vector<detail::TokenSegment> pad_qseg;  // ulysses_pad: the padded query rows
  std::vector<detail::OutSegment> pad_oseg;
  std::vector<PeerRead> reads;  // peer-read transports: this call's copies
  std::int64_t grows = 0;
  void reserve(AlignedBuffer& b, std::int64_t bytes) { grows += b.reserve(bytes) ? 1 : 0; }
};

}  // namespace uaa
