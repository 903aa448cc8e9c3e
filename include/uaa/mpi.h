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
  // Largest element count handed to one MPI call. MPI takes `int` counts; larger exchanges are
  // split into point-to-point messages of at most this many units. Lower it only to test that path.
  std::int64_t max_count = 2147483647;
};

std::shared_ptr<Communicator> make_mpi_communicator(MPI_Comm comm, const MpiOptions& options = {});

}  // namespace uaa
