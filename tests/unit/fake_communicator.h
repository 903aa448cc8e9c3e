// An in-process stand-in for a communicator of `size` ranks, seen from rank `rank`, for tests that
// run without mpirun. It only serves what one process can answer alone: allgather returns this
// rank's contribution in every slot (as if every rank had passed the same input), agree() returns
// this rank's vote as the verdict (as if every rank had voted the same), and exchange (so also
// alltoallv) works for size 1 only, where every message is to this rank itself: the i-th send is
// copied into the i-th receive (0-byte messages skipped, as the MPI transport does). It counts the
// calls so tests can assert "no communication".
#pragma once

#include <cstring>
#include <stdexcept>
#include <vector>

#include "comm/control_plane.h"
#include "uaa/communicator.h"

namespace uaa::test {

class FakeCommunicator final : public Communicator, public detail::ControlPlane {
 public:
  FakeCommunicator(int rank, int size) : rank_(rank), size_(size) {}

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* transport() const override { return "fake"; }

  void allgather(const void* send, std::size_t bytes, void* recv) override {
    ++allgathers;
    for (int j = 0; j < size_; ++j) std::memcpy(static_cast<char*>(recv) + j * bytes, send, bytes);
  }

  // Counted as alltoallvs too: alltoallv() is a convenience over exchange().
  void exchange(std::span<const Message> sends, std::span<const Message> recvs) override {
    ++exchanges;
    ++alltoallvs;
    if (size_ != 1) throw std::logic_error("FakeCommunicator::exchange needs size 1");
    std::vector<const Message*> in, out;
    for (const Message& m : sends)
      if (m.bytes != 0) out.push_back(&m);
    for (const Message& m : recvs)
      if (m.bytes != 0) in.push_back(&m);
    if (in.size() != out.size()) throw std::logic_error("self message counts differ");
    for (std::size_t i = 0; i < in.size(); ++i) {
      if (in[i]->peer != 0 || out[i]->peer != 0) throw std::logic_error("peer is not rank 0");
      if (in[i]->bytes != out[i]->bytes || in[i]->bytes < 0)
        throw std::logic_error("self message sizes differ");
      std::memmove(in[i]->data, out[i]->data, static_cast<std::size_t>(in[i]->bytes));
    }
  }

  detail::Verdict agree(const detail::Vote& mine) override {
    ++agrees;
    detail::Verdict v;
    v.kind_min = v.kind_max = static_cast<std::uint8_t>(mine.kind);
    v.fingerprint_min = v.fingerprint_max = mine.fingerprint;
    v.fingerprint_max_rank = 0;
    v.sequence_min = v.sequence_max = agreements_;
    v.sequence_max_rank = 0;
    v.kernel_min = v.kernel_max = mine.kernel;
    v.kernel_max_rank = 0;
    v.flags = mine.flags;
    if (mine.failed) {
      v.failed_count = size_;
      v.first_failed_rank = 0;
      v.code = mine.code;
      v.message = mine.message;
    }
    ++agreements_;
    return v;
  }
  std::uint64_t agreements() const override { return agreements_; }

  int allgathers = 0, alltoallvs = 0, exchanges = 0, agrees = 0;

 private:
  int rank_, size_;
  std::uint64_t agreements_ = 0;
};

}  // namespace uaa::test
