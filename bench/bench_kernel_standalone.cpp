// Standalone kernel benchmark (same code as `uaa bench kernel`).
#include "bench_kernel.h"

int main(int argc, char** argv) { return bench_kernel_main(argc, argv); }
