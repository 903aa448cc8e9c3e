#!/usr/bin/env bash
# --check fails (exit 1, a message on stderr) when the inputs hold NaN/Inf, and when an output
# value is NaN/Inf where the float64 reference is finite (a score that overflows float32).
#   check_nonfinite.sh <workdir> <mpiexec> <np-flag> <uaa>
set -u
work="$1"; mpiexec="$2"; np="$3"; uaa="$4"
rm -rf "$work"; mkdir -p "$work"
fail=0
complain() { echo "FAILED: $*"; fail=1; }
export UAA_TIMEOUT_SECONDS=10
timeout 60 "$mpiexec" "$np" 2 "$uaa" run --seq 16 --heads 2 --head-dim 8 --save "$work/base" >/dev/null ||
  { echo "FAILED: could not make the data"; exit 1; }
# put4 <file> <element index> <4 bytes as printf escapes>: overwrite one float32 of the data.
put4() {
  local size elements offset
  size=$(stat -c %s "$1"); elements=$((16 * 2 * 8))
  offset=$((size - elements * 4 + $2 * 4))
  printf "$3" | dd of="$1" bs=1 seek="$offset" conv=notrunc status=none
}
check() {  # check <name> <dir>: runs --check on <dir>
  timeout -k 5 60 "$mpiexec" "$np" 2 "$uaa" run --load "$2" --check --json >"$work/$1.out" 2>"$work/$1.err"
  rc=$?
  echo "== $1: exit $rc"; cat "$work/$1.out" "$work/$1.err" | grep -E '^(uaa run|\{)' || true
}

# A NaN in q (token 0, head 0, dim 5).
cp -r "$work/base" "$work/nan"
put4 "$work/nan/q.npy" 5 '\x00\x00\xc0\x7f'
check nan "$work/nan"
[[ $rc -eq 1 ]] || complain "nan: exit $rc, expected 1"
grep -Eq '^uaa run: check failed: the inputs hold 1 NaN/Inf value.*q token 0, head 0, dim 5: nan' "$work/nan.err" ||
  complain "nan: no message naming the NaN input"
grep -Eq '"check_passed": false' "$work/nan.out" || complain "nan: JSON check_passed is not false"

# q and k of 1e30 at the same place: the score overflows float32 (the output row is NaN) but not
# float64 (the reference is finite).
cp -r "$work/base" "$work/huge"
put4 "$work/huge/q.npy" 0 '\xca\xf2\x49\x71'
put4 "$work/huge/k.npy" 0 '\xca\xf2\x49\x71'
check huge "$work/huge"
[[ $rc -eq 1 ]] || complain "huge: exit $rc, expected 1"
grep -Eq '^uaa run: check failed: [0-9]+ output value\(s\) are NaN/Inf where the float64 reference is finite' "$work/huge.err" ||
  complain "huge: no message about non-finite outputs"
grep -Eq '"nonfinite_outputs": [1-9]' "$work/huge.out" || complain "huge: JSON nonfinite_outputs is 0"

# The untouched data passes.
check base "$work/base"
[[ $rc -eq 0 ]] || complain "base: exit $rc, expected 0"
exit $fail
