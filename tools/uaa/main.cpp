#include <cstdio>
#include <vector>
#include "uaa/mpi.h"
#include "uaa/uaa.h"
int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  {
    auto comm = uaa::make_mpi_communicator(MPI_COMM_WORLD);
    uaa::AttentionShape shape{.q_heads = 4, .kv_heads = 2, .head_dim = 8};
    auto plan = uaa::Plan::create(*comm, shape, 5 + comm->rank(), 5 + comm->rank());
    std::printf("%s\n", plan.describe().c_str());
  }
  MPI_Finalize();
}
