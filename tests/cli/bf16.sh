#!/usr/bin/env bash
# --dtype bf16: while no kernel supports bf16, a clean "not supported" error (exit 2, no hang);
# once one does, the check must pass (bitwise equal to the single-rank run).
#   bf16.sh <mpiexec> <np-flag> <uaa>
set -u
mpiexec="$1"; np="$2"; uaa="$3"
out=$("$mpiexec" "$np" 2 "$uaa" run --lens 33,40 --heads 4 --kv-heads 2 --head-dim 16 --causal \
      --dtype bf16 --check --json 2>/tmp/uaa_bf16_err.$$)
rc=$?
err=$(cat /tmp/uaa_bf16_err.$$); rm -f /tmp/uaa_bf16_err.$$
echo "exit status: $rc"; echo "stdout: $out"; echo "stderr: $err"
if [[ $rc -eq 0 ]]; then
  grep -Eq '"dtype": "bf16"' <<<"$out" && grep -Eq '"bitwise_equal": *true' <<<"$out" && exit 0
  echo "FAILED: bf16 run succeeded but the check did not pass"; exit 1
fi
if [[ $rc -eq 2 ]] && grep -Eq 'uaa run: .*bf16 is not supported' <<<"$err" && [[ -z "$out" ]]; then
  echo "bf16 not supported by this kernel: clean error, as expected"; exit 0
fi
echo "FAILED: unexpected result"; exit 1
