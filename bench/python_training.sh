#!/usr/bin/env bash
# The tiny-transformer example (examples/python/tiny_transformer.py) per optimizer step: 2 ranks x
# 1 thread against 1 rank x 1 thread, the same model and sequence, alternating invocations.
# Usage: bench/python_training.sh [build dir] [pairs] [-- extra example options]
# Prints one line per run and the ratio of the medians (each run: the median step after step 0,
# the maximum over ranks). MALLOC=keep runs both with glibc told to keep freed memory
# (MALLOC_MMAP_THRESHOLD_=32 MiB, MALLOC_TRIM_THRESHOLD_=16 GiB): every step allocates its
# activations anew, and on this VM a page touched for the first time costs microseconds, so
# without it the step times vary by +-25% from run to run (docs/PERFORMANCE.md, "Python").
set -euo pipefail
build=${1:-build}
pairs=${2:-3}
shift $(( $# >= 2 ? 2 : $# ))
[ "${1:-}" = "--" ] && shift
model=(--seq 4096 --dim 256 --heads 4 --kv-heads 2 --layers 2 --vocab 1024 --steps 10
       --threads 1 --no-reference --json "$@")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# OpenBLAS (PyTorch's BLAS on Debian) picks its best kernels for this CPU: an environment that
# forces a core type (OPENBLAS_CORETYPE=Haswell halves sgemm on Zen 5) would slow the token-wise
# layers and flatter the ratio. Which core ran is printed.
unset OPENBLAS_CORETYPE OPENBLAS_L2_SIZE
echo "OpenBLAS core: $(OPENBLAS_VERBOSE=2 "$build/uaa-python" -c 'import torch; (torch.ones(64, 64) @ torch.ones(64, 64)).sum()' 2>&1 | sed -n 's/^Core: //p' | head -1)"
malloc=()
if [ "${MALLOC:-default}" = keep ]; then
  malloc=(-x MALLOC_MMAP_THRESHOLD_=33554432 -x MALLOC_TRIM_THRESHOLD_=17179869184)
fi
run() {  # ranks, lens
  mpirun -np "$1" --bind-to core -x UAA_NUM_THREADS=1 "${malloc[@]}" "$build/uaa-python" \
    examples/python/tiny_transformer.py "${model[@]}" ${2:+--lens "$2"}
}
out=$(mktemp)
for i in $(seq "$pairs"); do
  run 1 "" | tee -a "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("1 rank : %.1f ms/step %s" % (1e3*d["step_seconds_max_over_ranks"], {k: round(1e3*v, 1) for k, v in d["phase_seconds"].items()}))'
  run 2 2000,2096 | tee -a "$out" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("2 ranks: %.1f ms/step %s" % (1e3*d["step_seconds_max_over_ranks"], {k: round(1e3*v, 1) for k, v in d["phase_seconds"].items()}))'
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
one = [r["step_seconds_max_over_ranks"] for r in runs if r["ranks"] == 1]
two = [r["step_seconds_max_over_ranks"] for r in runs if r["ranks"] == 2]
print("pairs: " + ", ".join("%.2f" % (a / b) for a, b in zip(one, two)))
print("median 1 rank %.1f ms, 2 ranks %.1f ms: 2 ranks x 1 thread are %.2fx faster per step"
      % (1e3 * statistics.median(one), 1e3 * statistics.median(two),
         statistics.median(one) / statistics.median(two)))
PY
rm -f "$out"
