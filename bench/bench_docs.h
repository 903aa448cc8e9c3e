// `uaa bench docs`: packed documents (one plan with uaa::Documents) against the same documents one
// call each, with a calibration call for the cost model; under mpirun (bench/sweep.h for options).
#pragma once

int bench_docs_main(int argc, char** argv);  // under mpirun; owns MPI init/finalize
