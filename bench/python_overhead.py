#!/usr/bin/env python3
"""Python call overhead of uaa.attention against the same forward() called from C++.

    mpirun -np 2 --bind-to core -x UAA_NUM_THREADS=1 build/uaa-python bench/python_overhead.py

For each shape, in the same processes, on the same plan, arrays and workspace, in alternating
rounds (so that drift hits every variant alike):
  cpp          uaa::forward in a C++ loop (uaa._uaa.time_forward_cpp: no Python between calls),
               each call timed in C++;
  numpy        uaa.attention(q, k, v, plan, out=out) with NumPy arrays;
  numpy+alloc  the same without out= (the call allocates its output);
  torch        uaa.attention with torch CPU tensors and out= (views of the NumPy arrays);
  cpp@torch    the C++ loop on clones torch allocated (no Python): the memory's own effect;
  cpp_fwd_bwd  uaa::forward with a SavedForward, then uaa::backward (saved mode), in a C++ loop;
  autograd     torch.autograd.grad(uaa.torch.attention(q, k, v, plan), (q, k, v), dO): the same
               pair through the autograd Function (out, lse and gradients allocated by torch, the
               SavedForward taken from and returned to the plan's pool), against cpp_fwd_bwd.
Two measures of the Python overhead, both the median over all calls, then the maximum over ranks:
  same call    each Python call's wall time minus the wall time of the uaa::forward() (and
               backward()) calls inside it (timed by the binding around the C++ calls alone): what Python adds to that call,
               immune to the run-to-run noise of the collective call itself;
  vs C++ loop  median Python call minus median call of the C++ loop (noisier: two sets of calls).
The relative overhead divides the same-call overhead by the median C++ call (pair).

Shapes: FLUX (4609 tokens = 4096 image + 512 text + 1, 24 heads x 128, full attention, fp32) cut
2304/2305; tiny (a few tokens per rank, 2 heads x 16) and tiny causal GQA.
"""

import argparse
import json
import sys
import time

import numpy as np
from mpi4py import MPI

import uaa
from uaa import _uaa

try:
    import torch

    import uaa.torch

    torch.set_num_threads(1)
except ImportError:  # the torch variants are left out
    torch = None

SHAPES = {
    "flux": dict(total=4609, heads=24, kv_heads=24, head_dim=128, causal=False),
    "tiny": dict(total=16, heads=2, kv_heads=2, head_dim=16, causal=False),
    "tiny_gqa_causal": dict(total=64, heads=4, kv_heads=2, head_dim=32, causal=True),
}


def split(total, ranks):
    lens = [total // ranks] * ranks
    for r in range(total - sum(lens)):
        lens[ranks - 1 - r] += 1
    return lens


def time_python(fn, calls):
    """Per call: (wall seconds, wall - the C++ forward()/backward() calls inside it)."""
    out = []
    for _ in range(calls):
        c0 = _uaa.call_seconds_total()
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        out.append((wall, wall - (_uaa.call_seconds_total() - c0)))
    return out


def time_cpp(plan, q, k, v, out, calls):
    return [(t, 0.0) for t in _uaa.time_forward_cpp(plan._p, q, k, v, out, None, calls)]


def time_cpp_train(plan, q, k, v, out, lse, dout, grads, calls):
    return [(t, 0.0) for t in _uaa.time_forward_backward_cpp(plan._p, q, k, v, out, lse, dout,
                                                             *grads, calls)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="flux,tiny,tiny_gqa_causal")
    ap.add_argument("--rounds", type=int, default=0, help="default: 3 (flux), 30 (tiny)")
    ap.add_argument("--calls", type=int, default=0, help="calls per round (default: by shape)")
    ap.add_argument("--variants", default="", help="comma-separated subset (cpp always runs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    world = MPI.COMM_WORLD
    comm = uaa.Communicator.world()
    results = []
    for name in args.shapes.split(","):
        s = SHAPES[name]
        lens = split(s["total"], comm.size)
        n = lens[comm.rank]
        plan = uaa.Plan(comm, n, heads=s["heads"], kv_heads=s["kv_heads"],
                        head_dim=s["head_dim"], causal=s["causal"])
        rng = np.random.default_rng(comm.rank)
        q = rng.standard_normal((n, s["heads"], s["head_dim"]), dtype=np.float32)
        k = rng.standard_normal((n, s["kv_heads"], s["head_dim"]), dtype=np.float32)
        v = rng.standard_normal((n, s["kv_heads"], s["head_dim"]), dtype=np.float32)
        out = np.empty_like(q)
        calls = args.calls or (3 if name == "flux" else 100)
        variants = {
            "cpp": lambda: time_cpp(plan, q, k, v, out, calls),
            "numpy": lambda: time_python(lambda: uaa.attention(q, k, v, plan, out=out), calls),
            "numpy+alloc": lambda: time_python(lambda: uaa.attention(q, k, v, plan), calls),
        }
        if torch is not None:
            tq, tk, tv, tout = (torch.from_numpy(x) for x in (q, k, v, out))
            variants["torch"] = lambda: time_python(
                lambda: uaa.attention(tq, tk, tv, plan, out=tout), calls)
            # The C++ loop again, on tensors torch allocated itself (clones): what the memory
            # behind the arrays does to the call (page size), with no Python in the loop.
            cq, ck, cv, cout = (torch.from_numpy(x).clone() for x in (q, k, v, out))
            variants["cpp@torch"] = lambda: time_cpp(plan, cq, ck, cv, cout, calls)
            # Training: forward + backward, saved mode, C++ against autograd.
            lplan = plan._lse_plan()
            lse = np.empty((n, s["heads"]), np.float32)
            dout = rng.standard_normal(q.shape, dtype=np.float32)
            grads = [np.empty_like(x) for x in (q, k, v)]
            variants["cpp_fwd_bwd"] = lambda: time_cpp_train(lplan, q, k, v, out, lse, dout,
                                                             grads, calls)
            rq, rk, rv = (x.clone().requires_grad_() for x in (tq, tk, tv))
            tdout = torch.from_numpy(dout)
            variants["autograd"] = lambda: time_python(lambda: torch.autograd.grad(
                uaa.torch.attention(rq, rk, rv, plan), (rq, rk, rv), tdout), calls)
        if args.variants:
            keep = set(args.variants.split(",")) | {"cpp"}
            variants = {key: f for key, f in variants.items() if key in keep}
        uaa.attention(q, k, v, plan, out=out)  # warm-up: workspace grown, pages touched
        if name != "flux":
            for f in variants.values():
                f()
        per = {key: [] for key in variants}
        for _ in range(args.rounds or (3 if name == "flux" else 30)):  # alternating, so that drift hits every variant alike
            for key, f in variants.items():
                world.Barrier()
                per[key].extend(f())
        maxr = lambda x: world.allreduce(float(x), op=MPI.MAX)  # noqa: E731
        ref = lambda key: "cpp_fwd_bwd" if key == "autograd" else "cpp"  # noqa: E731
        med = {key: maxr(np.median([w for w, _ in t])) for key, t in per.items()}
        inside = {key: maxr(np.median([o for _, o in t])) for key, t in per.items()
                  if not key.startswith("cpp")}
        row = {"shape": name, "ranks": comm.size, "lens": lens, "calls": len(per["cpp"]),
               "median_us": {key: 1e6 * m for key, m in med.items()},
               "overhead_same_call_us": {key: 1e6 * o for key, o in inside.items()},
               "overhead_same_call_rel": {key: o / med[ref(key)] for key, o in inside.items()},
               "overhead_vs_cpp_loop_us": {key: 1e6 * (med[key] - med[ref(key)])
                                           for key in inside}}
        results.append(row)
        if comm.rank == 0 and not args.json:
            print("%s (%d ranks, lens %s, %d calls per variant, kernel %s, %d thread(s)):"
                  % (name, comm.size, lens, row["calls"], uaa.kernel_name(), uaa.num_threads()))
            print("  %-12s %12s %22s %20s" % ("variant", "median call", "overhead (same call)",
                                             "vs the C++ loop"))
            for key in variants:
                line = "  %-12s %9.1f us" % (key, row["median_us"][key])
                if key in inside:
                    line += " %9.2f us (%7.4f%%) %+11.1f us" % (
                        row["overhead_same_call_us"][key], 100 * row["overhead_same_call_rel"][key],
                        row["overhead_vs_cpp_loop_us"][key])
                print(line)
            sys.stdout.flush()
    if comm.rank == 0 and args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
