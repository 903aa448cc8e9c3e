// uaa/threads.h — how many threads the local attention kernel uses inside one rank.
//
// forward() runs attention on this rank's heads with a team of threads that split (head, query tile)
// work. Results are bitwise identical for every thread count. The count is, in order of precedence:
//   1. the last set_num_threads(n) with n >= 1;
//   2. the environment variable UAA_NUM_THREADS (read once, at first use);
//   3. a default that avoids oversubscription when several MPI ranks share a node: the CPUs this
//      process may run on (its affinity mask, which mpirun narrows when it binds ranks to cores),
//      capped at the node's CPUs divided by the ranks on this node (from the launcher's environment:
//      OMPI_COMM_WORLD_LOCAL_SIZE, MPI_LOCALNRANKS, SLURM_NTASKS_PER_NODE), at least 1.
//
//   uaa::set_num_threads(4);   // this rank uses 4 threads from now on
//   uaa::set_num_threads(0);   // back to UAA_NUM_THREADS or the default
//
// Each forward() call reads the count once, at its start; changing it from another thread while a
// call runs affects only later calls.
#pragma once

namespace uaa {

void set_num_threads(int n);  // n >= 1 fixes the count; 0 restores the default; n < 0 is an error
int num_threads();            // the count the next forward() will use (>= 1)

}  // namespace uaa
