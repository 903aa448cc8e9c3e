#!/usr/bin/env python3
"""uaa from Python: every rank holds a different number of tokens (no padding anywhere).

    mpirun -np 2 build/uaa-python examples/python/demo.py       # build/uaa-python: see README

1. NumPy, float32: causal GQA attention (24 query heads, 8 key/value heads, head_dim 128) over
   1000 + 1001 tokens (rank r holds 1000 + r, or --tokens N + r; with more than 2 ranks rank 1
   holds 0),
   checked on rank 0 against a float64 reference and bitwise against one rank running the whole
   sequence.
2. PyTorch (if installed), autograd: the same layout in saved mode; loss.backward() runs uaa's
   backward; dq, dk, dv checked bitwise against one rank.
Exit status 1 if a check fails.
"""

import sys

import numpy as np
from mpi4py import MPI

import uaa

HEADS, KV_HEADS, DIM = 24, 8, 128


def lengths(ranks, base):
    if ranks == 1:
        return [2 * base + 1]
    lens = [base + r for r in range(ranks)]
    if ranks > 2:
        lens[1] = 0  # a rank without tokens takes part all the same
    return lens


def reference(q, k, v):
    """float64 causal GQA attention of the whole sequence: [S, H, D]."""
    s, g = q.shape[0], HEADS // KV_HEADS
    masked = ~np.tri(s, dtype=bool)
    out = np.empty(q.shape, np.float64)
    for h in range(HEADS):  # one head at a time: [S, S] float64 scores
        qh, kh, vh = (x[:, i].astype(np.float64) for x, i in ((q, h), (k, h // g), (v, h // g)))
        scores = qh @ kh.T / np.sqrt(DIM)
        scores[masked] = -np.inf
        p = np.exp(scores - scores.max(axis=-1, keepdims=True))
        out[:, h] = (p @ vh) / p.sum(axis=-1, keepdims=True)
    return out


def main():
    world = MPI.COMM_WORLD
    comm = uaa.Communicator.world()
    rank, P = comm.rank, comm.size
    base = int(sys.argv[sys.argv.index("--tokens") + 1]) if "--tokens" in sys.argv else 1000
    lens = lengths(P, base)
    start, mine = sum(lens[:rank]), lens[rank]
    total = sum(lens)
    rng = np.random.default_rng(7)  # the same global data on every rank; each takes its slice
    Q = rng.standard_normal((total, HEADS, DIM), dtype=np.float32)
    K = rng.standard_normal((total, KV_HEADS, DIM), dtype=np.float32)
    V = rng.standard_normal((total, KV_HEADS, DIM), dtype=np.float32)
    q, k, v = Q[start:start + mine], K[start:start + mine], V[start:start + mine]

    plan = uaa.Plan(comm, mine, heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM, causal=True)
    out = uaa.attention(q, k, v, plan)  # collective; zero copies, GIL released
    if rank == 0:
        print(plan)
    print("rank %d: %d tokens of %d, out checksum %.6f (%s, %s)"
          % (rank, mine, total, float(out.sum(dtype=np.float64)), uaa.kernel_name(),
             "peer memory" if comm.can_read_peers else "messages"), flush=True)

    ok = True
    outs = world.gather(out, root=0)
    if rank == 0:
        whole = np.concatenate(outs)
        one = uaa.Communicator(MPI.COMM_SELF)
        alone = uaa.attention(Q, K, V, uaa.Plan(one, total, heads=HEADS, kv_heads=KV_HEADS,
                                                head_dim=DIM, causal=True))
        err = float(np.abs(whole - reference(Q, K, V)).max())
        bitwise = bool(np.array_equal(whole.view(np.uint32), alone.view(np.uint32)))
        print("numpy: max_abs_err vs float64 %.3e, bitwise equal to 1 rank: %s" % (err, bitwise))
        ok = bitwise and err < 1e-4

    try:
        import torch
    except ImportError:
        ok = world.bcast(ok, root=0)
        if rank == 0:
            print("torch not installed: autograd part skipped")
            print("OK" if ok else "FAILED")
        return 0 if ok else 1
    ok = autograd(world, plan, Q, K, V, start, mine, total) and ok
    ok = world.bcast(ok, root=0)
    if rank == 0:
        print("OK" if ok else "FAILED")
    return 0 if ok else 1


def autograd(world, plan, Q, K, V, start, mine, total):
    import torch

    import uaa.torch

    rank, ok = world.rank, True
    q, k, v = Q[start:start + mine], K[start:start + mine], V[start:start + mine]
    torch.manual_seed(0)
    dO = torch.randn(total, HEADS, DIM)
    qt, kt, vt = (torch.from_numpy(x.copy()).requires_grad_() for x in (q, k, v))
    o = uaa.torch.attention(qt, kt, vt, plan)           # saved mode
    (o * dO[start:start + mine]).sum().backward()         # uaa's backward (collective)
    grads = world.gather([t.grad.numpy() for t in (qt, kt, vt)], root=0)
    if rank == 0:
        Qt, Kt, Vt = (torch.from_numpy(x.copy()).requires_grad_() for x in (Q, K, V))
        one_plan = uaa.Plan(uaa.Communicator(MPI.COMM_SELF), total, heads=HEADS,
                            kv_heads=KV_HEADS, head_dim=DIM, causal=True)
        (uaa.torch.attention(Qt, Kt, Vt, one_plan) * dO).sum().backward()
        same = all(np.array_equal(np.concatenate([g[i] for g in grads]).view(np.uint32),
                                  t.grad.numpy().view(np.uint32))
                   for i, t in enumerate((Qt, Kt, Vt)))
        print("torch autograd: dq, dk, dv bitwise equal to 1 rank: %s" % same)
        ok = same
    return ok


if __name__ == "__main__":
    sys.exit(main())
