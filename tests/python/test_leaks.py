"""Reference counts and memory over many calls: uaa.attention (NumPy, torch), uaa.torch.attention
forward + backward, calls that fail, plans made and dropped. Nothing may keep a reference to an
argument, and the resident memory may not grow once the workspaces have their size."""

import gc
import os
import sys

import numpy as np
from conftest import WORLD, mine, needs_torch, torch, uneven

import uaa

H, D = 4, 32
CALLS = 400


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def refcounts(*objs):
    return [sys.getrefcount(o) for o in objs]


def steady(fn, calls=CALLS, slack=1 << 20):
    """Runs fn `calls` times after a warm-up; returns the resident-memory growth, asserting it is
    below `slack` bytes and that the number of live Python objects did not grow."""
    for _ in range(20):
        fn()
    gc.collect()
    objects, before = len(gc.get_objects()), rss()
    for _ in range(calls):
        fn()
    gc.collect()
    grown, more = rss() - before, len(gc.get_objects()) - objects
    # Compared on every rank after the loop (all ranks made the same calls).
    results = WORLD.allgather((grown, more))
    assert all(g < slack for g, _ in results), "resident memory grew: %s" % results
    assert all(m < 50 for _, m in results), "live Python objects grew: %s" % results
    return grown


def arrays(seed=0):
    lens = uneven(61)
    start, n = mine(lens)
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((n, H, D), dtype=np.float32) for _ in range(3))
    return lens, n, q, k, v


def test_numpy_calls_keep_no_references(comm):
    lens, n, q, k, v = arrays()
    plan = uaa.Plan(comm, n, heads=H, head_dim=D, causal=True)
    out = np.empty_like(q)
    before = refcounts(q, k, v, out, plan)
    steady(lambda: uaa.attention(q, k, v, plan, out=out))
    steady(lambda: uaa.attention(q, k, v, plan, return_lse=True))
    assert refcounts(q, k, v, out, plan) == before


def test_failing_calls_keep_no_references(comm):
    lens, n, q, k, v = arrays(1)
    plan = uaa.Plan(comm, n, heads=H, head_dim=D)
    bad = q.astype(np.float64) if WORLD.rank == WORLD.size - 1 else q
    before = refcounts(q, k, v, bad, plan)

    def call():
        try:
            uaa.attention(bad, k, v, plan)
        except uaa.InvalidArgumentError:
            return
        raise AssertionError("no error")

    steady(call)
    assert refcounts(q, k, v, bad, plan) == before


def test_plans_are_freed(comm):
    lens, n, q, k, v = arrays(2)
    steady(lambda: uaa.attention(q, k, v, uaa.Plan.from_lengths(comm, lens, heads=H, head_dim=D)),
           calls=200)


@needs_torch
def test_torch_calls_keep_no_references(comm):
    import uaa.torch

    lens, n, q, k, v = arrays(3)
    plan = uaa.Plan(comm, n, heads=H, head_dim=D, causal=True)
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    dO = torch.ones(n, H, D)
    before = refcounts(tq, tk, tv, plan)
    steady(lambda: uaa.attention(tq.detach(), tk.detach(), tv.detach(), plan))

    def train_step():
        out = uaa.torch.attention(tq, tk, tv, plan)
        out.backward(dO)
        tq.grad = tk.grad = tv.grad = None

    steady(train_step, calls=200)
    steady(lambda: uaa.torch.attention(tq, tk, tv, plan, mode="recompute").backward(dO), calls=100)
    tq.grad = tk.grad = tv.grad = None
    assert refcounts(tq, tk, tv, plan) == before
    # Saved forwards are reused: one in the pool after every step, not one per step.
    assert len(plan._lse_plan()._saved_pool) == 1
