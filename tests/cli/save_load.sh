#!/usr/bin/env bash
# --save on 3 ranks, then --load of the same data on 2 ranks (another split) must reproduce every
# file byte for byte: inputs, and the output (P-rank runs are bitwise equal for every split).
# Also: loading with flags that disagree with the files, or a corrupt file, is a clean error.
#   save_load.sh <workdir> <mpiexec> <np-flag> <uaa>
set -eu
work="$1"; mpiexec="$2"; np="$3"; uaa="$4"
rm -rf "$work"
mkdir -p "$work"
set -x
"$mpiexec" "$np" 3 "$uaa" run --lens 50,0,70 --kv-lens 10,20,33 --heads 4 --kv-heads 2 \
  --head-dim 16 --causal --seed 7 --save "$work/a" --json >"$work/a.json"
"$mpiexec" "$np" 2 "$uaa" run --load "$work/a" --causal --save "$work/b" --check --json >"$work/b.json"
"$mpiexec" "$np" 1 "$uaa" run --load "$work/a" --lens 120 --kv-lens 63 --heads 4 --causal \
  --save "$work/c" --json >"$work/c.json"
set +x
for f in q k v out; do
  cmp "$work/a/$f.npy" "$work/b/$f.npy"
  cmp "$work/a/$f.npy" "$work/c/$f.npy"
done
grep -Eq '"lens": \[60, 60\]' "$work/b.json" || { echo "b.json: unexpected lens"; cat "$work/b.json"; exit 1; }
grep -Eq '"kv_lens": \[32, 31\]' "$work/b.json" || { echo "b.json: unexpected kv_lens"; exit 1; }
grep -Eq '"bitwise_equal": *true' "$work/b.json" || { echo "b.json: not bitwise equal"; exit 1; }
[[ $(wc -l <"$work/b.json") -eq 1 ]] || { echo "b.json: not one line"; exit 1; }
# Every report names the kernel and the data path; one rank has no peers, so it uses messages.
for f in a b c; do
  grep -Eq '"kernel": "[a-z0-9_]+"' "$work/$f.json" || { echo "$f.json: no kernel"; cat "$work/$f.json"; exit 1; }
  grep -Eq '"data_path": "(peer_memory|messages)"' "$work/$f.json" ||
    { echo "$f.json: no data_path"; cat "$work/$f.json"; exit 1; }
done
grep -Eq '"data_path": "messages"' "$work/c.json" || { echo "c.json: 1 rank but not messages"; cat "$work/c.json"; exit 1; }

# Errors: flags disagree with the file, lengths disagree with the file, a truncated k.npy.
expect_error() {  # expect_error <stderr ERE> <args...>
  local pat="$1"; shift
  set +e
  "$mpiexec" "$np" 2 "$uaa" run "$@" >"$work/err.out" 2>"$work/err.txt"
  local rc=$?
  set -e
  if [[ $rc -ne 2 ]] || ! grep -Eq -- "$pat" "$work/err.txt" || [[ -s "$work/err.out" ]]; then
    echo "FAILED: uaa run $* -> exit $rc, expected 2 and stderr matching: $pat"
    cat "$work/err.out" "$work/err.txt"
    exit 1
  fi
  echo "ok: uaa run $* -> $(grep -E -- "$pat" "$work/err.txt" | head -1)"
}
expect_error 'uaa run: rank 0: --heads 5 but .*q\.npy has heads 4' --load "$work/a" --heads 5
expect_error 'uaa run: rank 0: --head-dim 8 but .*q\.npy has head_dim 16' --load "$work/a" --head-dim 8
expect_error 'query lengths sum to 100 but .*q\.npy has 120 tokens' --load "$work/a" --lens 50,50
expect_error 'q\.npy: cannot open' --load "$work/missing"
mkdir -p "$work/bad"
cp "$work/a/q.npy" "$work/a/v.npy" "$work/bad/"
head -c 500 "$work/a/k.npy" >"$work/bad/k.npy"
expect_error 'k\.npy: data truncated' --load "$work/bad"
echo "save/load round trip: ok"
