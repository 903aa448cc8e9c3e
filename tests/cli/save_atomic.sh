#!/usr/bin/env bash
# --save writes all files or none, and never overwrites the --load inputs.
#   save_atomic.sh <workdir> <mpiexec> <np-flag> <uaa>
# 1. v.npy taken by a directory: refused before the run, the old q/k/out untouched.
# 2. A failure while writing v.npy's data (UAA_TOOL_SAVE_FAULT=write:v.npy): old files intact.
# 3. A failure renaming v.npy after q.npy and k.npy were renamed (rename:v.npy): rolled back.
# 4. No temporary or backup file is left behind.
# 5. --load D --save D --dtype bf16: the inputs stay byte-identical; out.npy is written.
set -u
work="$1"; mpiexec="$2"; np="$3"; uaa="$4"
rm -rf "$work"; mkdir -p "$work"
fail=0
complain() { echo "FAILED: $*"; fail=1; }
small=(--seq 24 --heads 2 --head-dim 8)
run() {  # run <name> <env...> -- <args...>: exit status in $rc, streams in $work/<name>.{out,err}
  local name="$1"; shift
  local -a envs=()
  while [[ "$1" != -- ]]; do envs+=("$1"); shift; done
  shift
  timeout -k 5 60 "$mpiexec" "$np" 2 env UAA_TIMEOUT_SECONDS=10 "${envs[@]+"${envs[@]}"}" "$uaa" run "$@" \
    >"$work/$name.out" 2>"$work/$name.err"
  rc=$?
  echo "== $name: exit $rc"; cat "$work/$name.err" | grep '^uaa run' || true
}
same_as_old() {  # same_as_old <dir> <files...>
  local d="$1"; shift
  for f in "$@"; do cmp -s "$d/$f" "$work/old/$f" || complain "$d/$f changed"; done
}
no_leftovers() {
  local left
  left=$(find "$1" -name '.*uaa-*' | head -5)
  [[ -z "$left" ]] || complain "temporary files left in $1: $left"
}

run old -- "${small[@]}" --seed 1 --save "$work/old"
[[ $rc -eq 0 ]] || complain "initial save failed"

# 1. A directory named v.npy.
cp -r "$work/old" "$work/d1"; rm "$work/d1/v.npy"; mkdir "$work/d1/v.npy"
run dir_collision -- "${small[@]}" --seed 2 --iters 100000 --save "$work/d1"
[[ $rc -eq 2 ]] || complain "dir_collision: exit $rc, expected 2"
grep -Eq '^uaa run: rank 0: --save: .*v\.npy exists and is not a regular file' "$work/dir_collision.err" ||
  complain "dir_collision: no message naming v.npy"
[[ -s "$work/dir_collision.out" ]] && complain "dir_collision: the run went ahead (stdout not empty)"
same_as_old "$work/d1" q.npy k.npy out.npy
no_leftovers "$work/d1"

# 2. A failure while writing v.npy's data.
cp -r "$work/old" "$work/d2"
run write_fault UAA_TOOL_SAVE_FAULT=write:v.npy -- "${small[@]}" --seed 2 --save "$work/d2"
[[ $rc -eq 2 ]] || complain "write_fault: exit $rc, expected 2"
grep -Eq '^uaa run: rank 0: --save: writing .*v\.npy.*injected' "$work/write_fault.err" ||
  complain "write_fault: no message"
same_as_old "$work/d2" q.npy k.npy v.npy out.npy
no_leftovers "$work/d2"

# 3. A failure renaming v.npy, after q.npy and k.npy were renamed: every file is put back.
cp -r "$work/old" "$work/d3"
run rename_fault UAA_TOOL_SAVE_FAULT=rename:v.npy -- "${small[@]}" --seed 2 --save "$work/d3"
[[ $rc -eq 2 ]] || complain "rename_fault: exit $rc, expected 2"
grep -Eq '^uaa run: rank 0: --save: renaming .*v\.npy.*put back' "$work/rename_fault.err" ||
  complain "rename_fault: no message"
same_as_old "$work/d3" q.npy k.npy v.npy out.npy
no_leftovers "$work/d3"
# ... and into an empty directory: nothing appears.
run rename_fault_new UAA_TOOL_SAVE_FAULT=rename:out.npy -- "${small[@]}" --save "$work/d3new"
[[ $rc -eq 2 ]] || complain "rename_fault_new: exit $rc, expected 2"
[[ -z "$(ls -A "$work/d3new")" ]] || complain "rename_fault_new: files left: $(ls -A "$work/d3new")"

# The same save without a fault replaces all four files.
run replace -- "${small[@]}" --seed 2 --save "$work/d3"
[[ $rc -eq 0 ]] || complain "replace: exit $rc"
cmp -s "$work/d3/q.npy" "$work/old/q.npy" && complain "replace: q.npy not replaced"
no_leftovers "$work/d3"

# 5. --load D --save D with bf16: the float32 inputs are kept, out.npy is the bf16 run's.
cp -r "$work/old" "$work/d5"
run same_dir -- --load "$work/d5" --save "$work/d5" --dtype bf16 --json
[[ $rc -eq 0 ]] || complain "same_dir: exit $rc"
same_as_old "$work/d5" q.npy k.npy v.npy
cmp -s "$work/d5/out.npy" "$work/old/out.npy" && complain "same_dir: out.npy not written (bf16 output equals f32?)"
grep -Eq '"saved": \["out\.npy"\]' "$work/same_dir.out" || complain "same_dir: JSON does not say only out.npy was saved"
no_leftovers "$work/d5"
exit $fail
