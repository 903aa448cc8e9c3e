#!/usr/bin/env bash
# Runs a command and checks its exit status, stdout and stderr.
#
#   expect.sh [--status N|nonzero] [--stdout ERE]... [--stderr ERE]... [--no-stdout ERE]...
#             [--no-stderr ERE]... [--stdout-once ERE]... [--stderr-once ERE]... [--stdout-lines N]
#             [--within SECONDS] -- command [args...]
#
# --status defaults to 0. Every --stdout/--stderr pattern (grep -E) must match somewhere in that
# stream; --no-stdout/--no-stderr patterns must not; --stdout-once/--stderr-once patterns must match
# exactly one line. --within: the command must end within that many seconds (it is killed at twice
# that, so a hang fails here rather than at the test's timeout). On failure, prints what was
# expected and both streams.
set -u
status=0
declare -a out_pats=() err_pats=() not_out_pats=() not_err_pats=() once_pats=() err_once_pats=()
lines=""
within=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --status) status="$2"; shift 2 ;;
    --stdout) out_pats+=("$2"); shift 2 ;;
    --stderr) err_pats+=("$2"); shift 2 ;;
    --no-stdout) not_out_pats+=("$2"); shift 2 ;;
    --no-stderr) not_err_pats+=("$2"); shift 2 ;;
    --stdout-once) once_pats+=("$2"); shift 2 ;;
    --stderr-once) err_once_pats+=("$2"); shift 2 ;;
    --within) within="$2"; shift 2 ;;
    --stdout-lines) lines="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "expect.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "expect.sh: no command" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s.%N)
if [[ -n "$within" ]]; then
  timeout -k 5 "$((within * 2))" "$@" >"$tmp/out" 2>"$tmp/err"
else
  "$@" >"$tmp/out" 2>"$tmp/err"
fi
rc=$?
elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')

fail=0
complain() { echo "FAILED: $*"; fail=1; }
if [[ "$status" == nonzero ]]; then
  [[ $rc -ne 0 ]] || complain "exit status 0, expected non-zero"
elif [[ $rc -ne $status ]]; then
  complain "exit status $rc, expected $status"
fi
for p in "${out_pats[@]+"${out_pats[@]}"}"; do
  grep -Eq -- "$p" "$tmp/out" || complain "stdout does not match: $p"
done
for p in "${not_out_pats[@]+"${not_out_pats[@]}"}"; do
  if grep -Eq -- "$p" "$tmp/out"; then complain "stdout matches: $p"; fi
done
for p in "${once_pats[@]+"${once_pats[@]}"}"; do
  n=$(grep -Ec -- "$p" "$tmp/out")
  [[ $n -eq 1 ]] || complain "stdout matches $n time(s), expected once: $p"
done
for p in "${err_pats[@]+"${err_pats[@]}"}"; do
  grep -Eq -- "$p" "$tmp/err" || complain "stderr does not match: $p"
done
for p in "${not_err_pats[@]+"${not_err_pats[@]}"}"; do
  if grep -Eq -- "$p" "$tmp/err"; then complain "stderr matches: $p"; fi
done
for p in "${err_once_pats[@]+"${err_once_pats[@]}"}"; do
  n=$(grep -Ec -- "$p" "$tmp/err")
  [[ $n -eq 1 ]] || complain "stderr matches $n time(s), expected once: $p"
done
if [[ -n "$within" ]] && awk -v e="$elapsed" -v w="$within" 'BEGIN { exit !(e > w) }'; then
  complain "took ${elapsed} s, expected at most ${within} s"
fi
if [[ -n "$lines" ]]; then
  n=$(wc -l <"$tmp/out")
  [[ $n -eq $lines ]] || complain "stdout has $n line(s), expected $lines"
fi

echo "command: $*"
echo "exit status: $rc (${elapsed} s)"
echo "--- stdout ---"; cat "$tmp/out"
echo "--- stderr ---"; cat "$tmp/err"
exit $fail
