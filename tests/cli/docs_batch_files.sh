#!/usr/bin/env bash
# uaa run --batch with files:
# 1. --save on 3 ranks of a batch of 2 with documents (one empty, one spanning ranks), cross
#    attention by document, a causal window and --backward writes [B, S, H, D] files; --load of
#    that directory on 2 ranks (recompute mode; the batch read from the files) and on 1 rank
#    (--batch 2 given) reproduces every file byte for byte, and --check passes.
# 2. A forward-only batched save loads back bitwise as well.
# 3. Misshapen inputs stop every rank with one clear error (exit 2, nothing on stdout): --batch
#    that disagrees with the files, a 3-d file next to 4-d ones, a dout.npy of another shape,
#    files whose batches differ.
#   docs_batch_files.sh <workdir> <mpiexec> <np-flag> <uaa>
set -u
work="$1"; mpiexec="$2"; np="$3"; uaa="$4"
rm -rf "$work"; mkdir -p "$work"
export UAA_TIMEOUT_SECONDS=10
fail=0
complain() { echo "FAILED: $*"; fail=1; }
run() {  # run <name> <np> <args...>: exit status in $rc, streams in $work/<name>.{out,err}
  local name="$1" n="$2"; shift 2
  timeout -k 5 60 "$mpiexec" "$np" "$n" "$uaa" run "$@" >"$work/$name.out" 2>"$work/$name.err"
  rc=$?
  echo "== $name: exit $rc"; grep -E '^(uaa run|\{)' "$work/$name.err" || true
}
expect_error() {  # expect_error <name> <np> <stderr ERE> <args...>: exit 2, the message once, no stdout
  local name="$1" n="$2" pat="$3"; shift 3
  run "$name" "$n" "$@"
  [[ $rc -eq 2 ]] || complain "$name: exit $rc, expected 2"
  [[ $(grep -Ec -- "$pat" "$work/$name.err") -eq 1 ]] || complain "$name: stderr does not match once: $pat"
  grep -q 'more rank(s) failed' "$work/$name.err" && complain "$name: the ranks did not fail alike"
  [[ -s "$work/$name.out" ]] && complain "$name: the run went ahead (stdout not empty)"
}
shape_of() { head -c 128 "$1" | tr -d '\0' | grep -ao "'shape': ([0-9, ]*)"; }
all=(q k v dout out dq dk dv)
mask=(--docs 20,0,35,20 --kv-docs 15,10,0,30 --causal --window 4,-1)

# 1. Round trip with --backward.
run a 3 --lens 30,0,45 --kv-lens 20,25,10 --batch 2 "${mask[@]}" --heads 4 --kv-heads 2 --head-dim 16 \
  --seed 5 --backward --save "$work/a" --json
[[ $rc -eq 0 ]] || complain "a: exit $rc"
grep -Eq '"documents": 4, "batch": 2, ' "$work/a.out" || complain "a: JSON does not report 4 documents, batch 2"
for f in q out dout dq; do
  [[ "$(shape_of "$work/a/$f.npy")" == "'shape': (2, 75, 4, 16)" ]] ||
    complain "a: $f.npy has $(shape_of "$work/a/$f.npy"), expected (2, 75, 4, 16)"
done
for f in k v dk dv; do
  [[ "$(shape_of "$work/a/$f.npy")" == "'shape': (2, 55, 2, 16)" ]] ||
    complain "a: $f.npy has $(shape_of "$work/a/$f.npy"), expected (2, 55, 2, 16)"
done
run b 2 --load "$work/a" "${mask[@]}" --backward --backward-mode recompute --save "$work/b" --check --json
[[ $rc -eq 0 ]] || complain "b: exit $rc"
grep -Eq '"lens": \[38, 37\], "kv_lens": \[28, 27\], .*"documents": 4, "batch": 2, ' "$work/b.out" ||
  complain "b: the batch or the split was not read from the files"
grep -Eq '"bitwise_equal": true, .*"check_passed": true, "backward": \{"mode": "recompute".*"check_passed": true\}, "load"' \
  "$work/b.out" || complain "b: the check did not pass"
run c 1 --load "$work/a" --batch 2 "${mask[@]}" --backward --save "$work/c"
[[ $rc -eq 0 ]] || complain "c: exit $rc"
for f in "${all[@]}"; do
  cmp -s "$work/a/$f.npy" "$work/b/$f.npy" || complain "$f.npy: 2-rank load differs from the 3-rank save"
  cmp -s "$work/a/$f.npy" "$work/c/$f.npy" || complain "$f.npy: 1-rank load differs from the 3-rank save"
done

# 2. Forward only, a batch of 3, no documents.
run fa 2 --lens 20,27 --batch 3 --heads 2 --head-dim 8 --window 2,2 --save "$work/fa"
[[ $rc -eq 0 ]] || complain "fa: exit $rc"
run fb 3 --load "$work/fa" --window 2,2 --save "$work/fb" --check --json
[[ $rc -eq 0 ]] || complain "fb: exit $rc"
grep -Eq '"batch": 3, .*"bitwise_equal": true, .*"check_passed": true' "$work/fb.out" || complain "fb: check"
for f in q k v out; do cmp -s "$work/fa/$f.npy" "$work/fb/$f.npy" || complain "fb: $f.npy differs"; done

# 3. Misshapen inputs.
expect_error batch_differs 3 "^uaa run: rank 0: --batch 3 but .*/a/q\.npy has shape \(2, 75, 4, 16\) \(batch 2\)" \
  --load "$work/a" --batch 3
run fa3 1 --seq 47 --heads 2 --head-dim 8 --save "$work/fa3"
[[ $rc -eq 0 ]] || complain "fa3: exit $rc"
expect_error batch_needs_4d 2 "^uaa run: rank 0: --batch 2 but .*/fa3/q\.npy has shape \(47, 2, 8\) \(a batch needs \[batch, tokens, heads, head_dim\] files\)" \
  --load "$work/fa3" --batch 2
mkdir -p "$work/mixed"
cp "$work/fa/q.npy" "$work/fa/v.npy" "$work/mixed/"
cp "$work/fa3/k.npy" "$work/mixed/"
expect_error mixed_dims 2 "^uaa run: rank 0: .*/mixed/k\.npy: shape \(47, 2, 8\) has 3 dimensions but q\.npy's \(3, 47, 2, 8\) has 4" \
  --load "$work/mixed"
cp "$work/a/q.npy" "$work/mixed/q.npy"; cp "$work/fa/k.npy" "$work/fa/v.npy" "$work/mixed/"
expect_error batches_differ 3 "^uaa run: rank 0: .*/mixed/k\.npy: batch 3 \(shape \(3, 47, 2, 8\)\) differs from q\.npy's 2" \
  --load "$work/mixed"
cp -r "$work/a" "$work/baddout"
cp "$work/a/k.npy" "$work/baddout/dout.npy"
expect_error bad_dout 3 "^uaa run: rank 0: --backward with --load needs .*dout\.npy \(dO, the gradient of out: float32 \[B, Sq, Hq, D\] like q\.npy\): its shape \(2, 55, 2, 16\) differs from q\.npy.s \(2, 75, 4, 16\)" \
  --load "$work/baddout" "${mask[@]}" --backward

[[ $fail -eq 0 ]] && echo "documents/batch files: ok"
exit $fail
