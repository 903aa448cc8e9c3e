// `uaa bench kernel`: times the local attention kernel against OpenBLAS in the same process.
//
//   uaa bench kernel --seq 4096 --heads 8 --head-dim 128 --dtype f32 --threads 1 [--causal] [--json]
//                    [--backward [--unordered-dq] [--compare-ordering]]
//
// Reports GFLOP/s against an OpenBLAS sgemm (ratio_to_sgemm) and against the FMA peak of the core
// measured in the same process (ratio_to_peak, peak.h), and names the OpenBLAS core that ran.
// OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE in the environment pick OpenBLAS's core (the code leaves them
// alone); to measure the one OpenBLAS picks for this CPU, unset them for the command:
//   env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE build/tools/uaa bench kernel ...
//
// argv[0] is the command's name; the options follow. Prints a table row followed by indented lines
// (dQ orderings with --compare-ordering, the peak, OpenBLAS), or one JSON object with --json, and
// returns 0; or prints a usage error to stderr and returns 2.
#pragma once

int bench_kernel_main(int argc, char** argv);
