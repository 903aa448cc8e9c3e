// More than 2^31 elements through one exchange: rank 0 sends 2^31 + 2^20 bf16-sized (2-byte)
// elements to rank 1 in one Communicator::alltoallv (one exchange() message), and rank 1 checks
// every element against a formula of its index. (MPI counts are `int`: this is the path that must
// not overflow.) Memory: 4.3 GB on each of the two ranks. Label `large`; runs in CI (about 10 s).
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "uaa/error.h"
#include "uaa/mpi.h"

namespace {

std::uint16_t value_at(std::int64_t i) {
  return static_cast<std::uint16_t>((static_cast<std::uint64_t>(i) * 2654435761u) >> 13);
}

TEST(LargeCount, MoreThan2To31ElementsThroughOneExchange) {
  auto comm = uaa::make_mpi_communicator(MPI_COMM_WORLD);
  ASSERT_EQ(comm->size(), 2) << "run on exactly 2 ranks";
  const int me = comm->rank();
  constexpr std::int64_t kElements = (std::int64_t{1} << 31) + (std::int64_t{1} << 20);
  constexpr std::int64_t kBytes = kElements * 2;
  static_assert(kElements > 2147483647);

  std::unique_ptr<std::uint16_t[]> buffer(new std::uint16_t[kElements]);
  if (me == 0)
    for (std::int64_t i = 0; i < kElements; ++i) buffer[i] = value_at(i);
  const std::int64_t zero[2] = {0, 0};
  const std::int64_t to_one[2] = {0, kBytes};  // rank 0 -> rank 1
  const std::int64_t from_zero[2] = {kBytes, 0};
  const bool sender = me == 0;
  comm->alltoallv(sender ? buffer.get() : nullptr, sender ? to_one : zero, zero,
                  sender ? nullptr : buffer.get(), sender ? zero : from_zero, zero);
  if (me == 1) {
    std::int64_t wrong = 0, first_wrong = -1;
    for (std::int64_t i = 0; i < kElements; ++i)
      if (buffer[i] != value_at(i) && wrong++ == 0) first_wrong = i;
    EXPECT_EQ(wrong, 0) << "first wrong element " << first_wrong;
  }
}

}  // namespace
