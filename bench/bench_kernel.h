// `uaa bench kernel`: times the local attention kernel against OpenBLAS in the same process.
//
//   uaa bench kernel --seq 4096 --heads 8 --head-dim 128 --dtype f32 --threads 1 [--causal] [--json]
//
// argv[0] is the command's name; the options follow. Prints a table row (or one JSON object with
// --json) and returns 0, or prints a usage error to stderr and returns 2.
#pragma once

int bench_kernel_main(int argc, char** argv);
