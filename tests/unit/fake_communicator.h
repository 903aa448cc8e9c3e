// An in-process stand-in for a communicator of `size` ranks, seen from rank `rank`, for tests that
// run without mpirun. It only serves what one process can answer alone: allgather returns this
// rank's contribution in every slot (as if every rank had passed the same input), and alltoallv
// works for size 1 only. It counts the calls so tests can assert "no communication".
#pragma once

#include <cstring>
#include <stdexcept>

#include "uaa/communicator.h"

namespace uaa::test {

class FakeCommunicator final : public Communicator {
 public:
  FakeCommunicator(int rank, int size) : rank_(rank), size_(size) {}

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* transport() const override { return "fake"; }

  void allgather(const void* send, std::size_t bytes, void* recv) override {
    ++allgathers;
    for (int j = 0; j < size_; ++j) std::memcpy(static_cast<char*>(recv) + j * bytes, send, bytes);
  }

  void alltoallv(const void* send, std::span<const std::int64_t> send_counts,
                 std::span<const std::int64_t> send_displs, void* recv,
                 std::span<const std::int64_t> recv_counts,
                 std::span<const std::int64_t> recv_displs, std::int64_t) override {
    ++alltoallvs;
    if (size_ != 1) throw std::logic_error("FakeCommunicator::alltoallv needs size 1");
    if (send_counts[0] != recv_counts[0]) throw std::logic_error("self counts differ");
    if (send_counts[0] > 0)
      std::memcpy(static_cast<char*>(recv) + recv_displs[0],
                  static_cast<const char*>(send) + send_displs[0],
                  static_cast<std::size_t>(send_counts[0]));
  }

  int allgathers = 0, alltoallvs = 0;

 private:
  int rank_, size_;
};

}  // namespace uaa::test
