#!/usr/bin/env bash
# uaa run --backward with files:
# 1. --save on 3 ranks writes dout.npy and dq/dk/dv.npy; --load of that directory on 2 ranks
#    (recompute mode) and on 1 rank reproduces every file byte for byte (so dout.npy was read:
#    the seed differs), and --check passes.
# 2. --load D --save D --backward: the inputs (dout.npy included) stay as they were; only the
#    outputs are written.
# 3. A failed rename of dv.npy puts every file back (all or none, with the gradients too).
# 4. --load without dout.npy, or with a dout.npy of another shape: a clear error (exit 2, once,
#    nothing on stdout) before any collective work.
# 5. A NaN in dout.npy: --check fails (exit 1) naming it.
# 6. bf16: the check passes, or the kernel's clean "not supported" error.
#   backward.sh <workdir> <mpiexec> <np-flag> <uaa>
set -u
work="$1"; mpiexec="$2"; np="$3"; uaa="$4"
rm -rf "$work"; mkdir -p "$work"
export UAA_TIMEOUT_SECONDS=10
fail=0
complain() { echo "FAILED: $*"; fail=1; }
run() {  # run <name> <np> <env...> -- <args...>: exit status in $rc, streams in $work/<name>.{out,err}
  local name="$1" n="$2"; shift 2
  local -a envs=()
  while [[ "$1" != -- ]]; do envs+=("$1"); shift; done
  shift
  timeout -k 5 60 "$mpiexec" "$np" "$n" env "${envs[@]+"${envs[@]}"}" "$uaa" run "$@" \
    >"$work/$name.out" 2>"$work/$name.err"
  rc=$?
  echo "== $name: exit $rc"; grep -E '^(uaa run|\{)' "$work/$name.err" || true
}
all=(q k v dout out dq dk dv)

# 1. Round trip.
run a 3 -- --lens 50,0,70 --kv-lens 10,20,33 --heads 4 --kv-heads 2 --head-dim 16 --causal --seed 7 \
  --backward --save "$work/a" --json
[[ $rc -eq 0 ]] || complain "a: exit $rc"
grep -Eq '"saved": \["q\.npy", "k\.npy", "v\.npy", "dout\.npy", "out\.npy", "dq\.npy", "dk\.npy", "dv\.npy"\]' \
  "$work/a.out" || complain "a: JSON does not list the eight files"
run b 2 -- --load "$work/a" --causal --backward --backward-mode recompute --save "$work/b" --check --json
[[ $rc -eq 0 ]] || complain "b: exit $rc"
grep -Eq '"backward": \{"mode": "recompute".*"check_passed": true\}, "load"' "$work/b.out" ||
  complain "b: the backward check did not pass"
run c 1 -- --load "$work/a" --causal --backward --save "$work/c"
[[ $rc -eq 0 ]] || complain "c: exit $rc"
for f in "${all[@]}"; do
  cmp -s "$work/a/$f.npy" "$work/b/$f.npy" || complain "$f.npy: 2-rank load differs from the 3-rank save"
  cmp -s "$work/a/$f.npy" "$work/c/$f.npy" || complain "$f.npy: 1-rank load differs from the 3-rank save"
done

# 2. --save into the --load directory: only the outputs.
cp -r "$work/a" "$work/d"
for f in out dq dk dv; do printf 'x' >"$work/d/$f.npy"; done  # replaced by the run
run same_dir 2 -- --load "$work/d" --causal --backward --save "$work/d" --json
[[ $rc -eq 0 ]] || complain "same_dir: exit $rc"
grep -Eq '"saved": \["out\.npy", "dq\.npy", "dk\.npy", "dv\.npy"\]' "$work/same_dir.out" ||
  complain "same_dir: JSON does not list only the outputs"
for f in "${all[@]}"; do cmp -s "$work/a/$f.npy" "$work/d/$f.npy" || complain "same_dir: $f.npy differs"; done

# 3. A failed rename of the last file (dv.npy): every file as it was, no temporaries.
cp -r "$work/a" "$work/e"
run rename_fault 2 UAA_TOOL_SAVE_FAULT=rename:dv.npy -- --seq 20 --heads 2 --head-dim 8 --backward \
  --save "$work/e"
[[ $rc -eq 2 ]] || complain "rename_fault: exit $rc, expected 2"
grep -Eq '^uaa run: rank 0: --save: renaming .*dv\.npy.*put back' "$work/rename_fault.err" ||
  complain "rename_fault: no message"
for f in "${all[@]}"; do cmp -s "$work/a/$f.npy" "$work/e/$f.npy" || complain "rename_fault: $f.npy changed"; done
left=$(find "$work/e" -name '.*uaa-*' | head -3)
[[ -z "$left" ]] || complain "rename_fault: temporary files left: $left"

# 4. dout.npy missing, or of another shape.
mkdir -p "$work/nodout"
cp "$work/a/q.npy" "$work/a/k.npy" "$work/a/v.npy" "$work/nodout/"
run nodout 3 -- --load "$work/nodout" --backward --iters 1000000
[[ $rc -eq 2 ]] || complain "nodout: exit $rc, expected 2"
[[ $(grep -Ec '^uaa run: rank 0: --backward with --load needs .*nodout/dout\.npy \(dO, the gradient of out: float32 \[Sq, Hq, D\] like q\.npy\): .*cannot open' "$work/nodout.err") -eq 1 ]] ||
  complain "nodout: not one clear message"
grep -q 'more rank(s) failed' "$work/nodout.err" && complain "nodout: the ranks did not fail alike"
[[ -s "$work/nodout.out" ]] && complain "nodout: the run went ahead (stdout not empty)"
cp "$work/a/k.npy" "$work/nodout/dout.npy"
run badshape 2 -- --load "$work/nodout" --backward
[[ $rc -eq 2 ]] || complain "badshape: exit $rc, expected 2"
grep -Eq '^uaa run: rank 0: --backward with --load needs .*: its shape \(63, 2, 16\) differs from q\.npy.s \(120, 4, 16\)' \
  "$work/badshape.err" || complain "badshape: no message naming the shapes"

# 5. A NaN in dout.npy (its first element): the check fails, naming dout.
cp -r "$work/a" "$work/nan"
size=$(stat -c %s "$work/nan/dout.npy")
printf '\x00\x00\xc0\x7f' | dd of="$work/nan/dout.npy" bs=1 seek=$((size - 120 * 4 * 16 * 4)) conv=notrunc status=none
run nan 2 -- --load "$work/nan" --causal --backward --check --json
[[ $rc -eq 1 ]] || complain "nan: exit $rc, expected 1"
grep -Eq '^uaa run: check failed: the inputs hold 1 NaN/Inf value.*dout token 0, head 0, dim 0: nan' "$work/nan.err" ||
  complain "nan: no message naming dout"

# 6. bf16.
run bf16 2 -- --lens 33,40 --heads 6 --kv-heads 2 --head-dim 16 --causal --dtype bf16 --backward --check --json
if [[ $rc -eq 0 ]]; then
  grep -Eq '"dtype": "bf16".*"dq": \{[^}]*"bitwise_equal": true.*"dk": \{[^}]*"bitwise_equal": true.*"dv": \{[^}]*"bitwise_equal": true.*"check_passed": true\}\}$' \
    "$work/bf16.out" || complain "bf16: the backward check did not pass"
elif [[ $rc -eq 2 ]] && grep -Eq 'uaa run: .*(bf16 is not supported|does not support bf16)' "$work/bf16.err"; then
  echo "bf16 not supported by this kernel: clean error, as expected"
else
  complain "bf16: exit $rc"
fi
[[ $fail -eq 0 ]] && echo "backward files: ok"
exit $fail
