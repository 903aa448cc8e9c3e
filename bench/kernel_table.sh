#!/bin/sh
# The kernel table of docs/PERFORMANCE.md: every row run 3 times (JSON lines on stdout); the table
# reports the median of each field. Usage: bench/kernel_table.sh [uaa binary]
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are unset for the command alone, so OpenBLAS runs the core it
# picks for this CPU (each JSON line names it: openblas_core, and the FMA peak: peak_*_gflops).
U=${1:-build/tools/uaa}
B="env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $U bench kernel --seq 4096 --heads 8 --reps 7 --json"
for rep in 1 2 3; do
  $B --head-dim 128 --dtype f32  --threads 1
  $B --head-dim 128 --dtype bf16 --threads 1
  $B --head-dim 64  --dtype f32  --threads 1
  $B --head-dim 128 --dtype f32  --threads 1 --causal
  $B --head-dim 128 --dtype f32  --threads 2
  $B --head-dim 128 --dtype bf16 --threads 2
  UAA_ISA=avx512 $B --head-dim 128 --dtype bf16 --threads 1 --no-unfused
  UAA_ISA=avx2 $B --head-dim 128 --dtype f32 --threads 1 --no-unfused
  UAA_ISA=portable $B --head-dim 128 --dtype f32 --threads 1 --no-unfused
  $B --head-dim 128 --dtype f32  --threads 1 --backward
  $B --head-dim 128 --dtype f32  --threads 1 --backward --causal
  $B --head-dim 128 --dtype bf16 --threads 1 --backward
  $B --head-dim 128 --dtype f32  --threads 2 --backward --compare-ordering
done
