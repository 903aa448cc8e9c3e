// `uaa bench` (strategies): the four strategies of uaa::forward() on the same inputs in one MPI run,
// against a raw MPI_Alltoallv of the same bytes; JSON/CSV/plot output (bench/sweep.h for options).
#pragma once

int bench_strategies_main(int argc, char** argv);  // under mpirun; owns MPI init/finalize
