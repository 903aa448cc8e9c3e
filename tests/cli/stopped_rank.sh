#!/usr/bin/env bash
# A rank that stops (SIGSTOP) in the middle of a run: the others time out (UAA_TIMEOUT_SECONDS=3),
# the rank that sees it prints the timeout and aborts the job (MPI_Abort), so mpirun ends with a
# non-zero status within seconds instead of waiting for the stopped rank (MPI_Finalize would).
#   stopped_rank.sh <workdir> <mpiexec> <np-flag> <uaa>
set -u
work="$1"; mpiexec="$2"; np="$3"; uaa="$4"
rm -rf "$work"; mkdir -p "$work"
pidfile="$work/rank1.pid"
args=(run --seq 2048 --heads 8 --head-dim 64 --iters 1000000)
export UAA_TIMEOUT_SECONDS=3
export UAA_TOOL_PROGRESS_SECONDS=0.5  # rank 0 says when the timed calls run
# Rank 1 writes its pid (sh execs uaa, so the pid is the rank's).
timeout -k 5 60 "$mpiexec" "$np" 1 "$uaa" "${args[@]}" : "$np" 1 \
  sh -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$uaa" "${args[@]}" \
  >"$work/out" 2>"$work/err" &
job=$!
for _ in $(seq 100); do [[ -s "$pidfile" ]] && break; sleep 0.1; done
pid=$(cat "$pidfile" 2>/dev/null)
cleanup() {
  [[ -n "${pid:-}" ]] && kill -CONT "$pid" 2>/dev/null
  kill "$job" 2>/dev/null  # if the job is still running (a failure of this test)
}
trap cleanup EXIT
if [[ -z "$pid" ]]; then echo "FAILED: rank 1 never started"; cat "$work/err"; exit 1; fi
# Stop rank 1 once the timed calls run (not in MPI_Init, whose own waits have no deadline).
for _ in $(seq 300); do grep -q 'progress: .*timed call' "$work/err" && break; sleep 0.1; done
grep -q 'progress: .*timed call' "$work/err" || { echo "FAILED: the timed calls never started"; cat "$work/err"; exit 1; }
kill -STOP "$pid"
t0=$(date +%s.%N)
wait "$job"
rc=$?
t1=$(date +%s.%N)
[[ -n "${pid:-}" ]] && kill -CONT "$pid" 2>/dev/null
elapsed=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
echo "exit status: $rc after ${elapsed} s"
echo "--- stderr ---"; cat "$work/err"
fail=0
[[ $rc -ne 0 ]] || { echo "FAILED: exit status 0"; fail=1; }
[[ $rc -ne 124 && $rc -ne 137 ]] || { echo "FAILED: the job did not end by itself (killed by timeout)"; fail=1; }
awk -v e="$elapsed" 'BEGIN { exit !(e <= 15) }' || { echo "FAILED: took ${elapsed} s, expected <= 15"; fail=1; }
grep -Eq '^uaa run: rank 0: .*timed out after' "$work/err" ||
  { echo "FAILED: stderr does not name the timeout on rank 0"; fail=1; }
exit $fail
