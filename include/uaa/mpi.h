// uaa/mpi.h — the MPI transport.
//
//   MPI_Init(&argc, &argv);
//   std::shared_ptr<uaa::Communicator> comm = uaa::make_mpi_communicator(MPI_COMM_WORLD);
//
// The communicator duplicates the caller's MPI_Comm (uaa traffic never mixes with the caller's) and
// sets MPI_ERRORS_RETURN on the duplicate so transport errors become uaa::Error. It frees the
// duplicate when destroyed: destroy it before MPI_Finalize.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <memory>

#include "uaa/communicator.h"

namespace uaa {

struct MpiOptions {
  // MPI takes `int` counts. An exchange in which some rank's send or receive buffer exceeds
  // max_count bytes is done with point-to-point messages of at most max_count elements each (an
  // element is up to 4 KiB) addressed with 64-bit offsets; smaller ones use one MPI_Alltoallv.
  // Lower it only to test the large-message path at small sizes.
  std::int64_t max_count = 2147483647;
};

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const MpiOptions& options = {});

}  // namespace uaa
