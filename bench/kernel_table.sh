#!/bin/sh
# The kernel table of docs/PERFORMANCE.md: every row run 3 times (JSON lines on stdout); the table
# reports the median of each field. Usage: bench/kernel_table.sh [path/to/uaa_bench_kernel]
B=${1:-build/bench/uaa_bench_kernel}
for rep in 1 2 3; do
  $B --seq 4096 --heads 8 --head-dim 128 --dtype f32  --threads 1 --json
  $B --seq 4096 --heads 8 --head-dim 128 --dtype bf16 --threads 1 --json
  $B --seq 4096 --heads 8 --head-dim 64  --dtype f32  --threads 1 --json
  $B --seq 4096 --heads 8 --head-dim 128 --dtype f32  --threads 1 --causal --json
  $B --seq 4096 --heads 8 --head-dim 128 --dtype f32  --threads 2 --json
  $B --seq 4096 --heads 8 --head-dim 128 --dtype bf16 --threads 2 --json
  UAA_ISA=avx512 $B --seq 4096 --heads 8 --head-dim 128 --dtype bf16 --threads 1 --json --no-unfused
  UAA_ISA=avx2 $B --seq 4096 --heads 8 --head-dim 128 --dtype f32 --threads 1 --json --no-unfused
  UAA_ISA=portable $B --seq 4096 --heads 8 --head-dim 128 --dtype f32 --threads 1 --json --no-unfused
done
