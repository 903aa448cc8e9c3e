#!/usr/bin/env python3
"""A tiny transformer trained sequence-parallel with uaa (PyTorch autograd), checked against the
same training on one rank.

Run (the launcher build/uaa-python is the Python CMake found, with the build's uaa on its path):

    mpirun -np 2 build/uaa-python examples/python/tiny_transformer.py
    mpirun -np 3 build/uaa-python examples/python/tiny_transformer.py --lens 70,0,122

The model: token embeddings plus fixed sinusoidal positions, a few pre-LayerNorm blocks (causal GQA attention through
uaa.torch.attention, then an MLP), a final LayerNorm and a vocabulary head; the loss is next-token
cross entropy on random data. The sequence is cut over the ranks unevenly (--lens, 0 allowed):
every rank embeds, attends (uaa moves what attention needs between ranks), runs the MLP and the
loss on its own tokens only. The weight gradients are sums over all tokens, so each rank's are
summed over the ranks (an all-reduce: reduce-scatter + all-gather of one flat buffer that the
gradients live in) before the optimizer step, which is then identical on every rank.

Checks (rank 0, unless --no-reference): after the P-rank training, the same model (same seed) is
trained on one rank (a uaa plan over MPI.COMM_SELF holding the whole sequence) and
  - the loss of every step must match to fp32 rounding: the largest relative deviation is printed
    (limit --tolerance, 1e-5). Not bitwise: a weight gradient is a sum over tokens, and P ranks add
    their tokens' contributions in another order than one rank does;
  - the attention layers' outputs and input gradients must be bitwise those of one rank: at every
    step, every layer's gathered q, k, v and output gradient are run through uaa on one rank, and
    its output and dq, dk, dv must equal the P-rank ones bit for bit. (Step 0 also compares them
    with the 1-rank training's own tensors: those are bitwise equal too when PyTorch's token-wise
    ops give every row the same bits whatever the number of rows, which is reported, not required.)
Exit status 1 if a check fails.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI

import uaa
import uaa.torch


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lens", help="tokens per rank, comma-separated (default: --seq cut unevenly)")
    ap.add_argument("--seq", type=int, default=192, help="total tokens when --lens is not given")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64, help="model width")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=97)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mode", choices=("saved", "recompute"), default="saved")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="attention input dtype (the rest of the model is float32)")
    ap.add_argument("--threads", type=int, default=1, help="torch and uaa threads per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=1e-5)
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the 1-rank training and the checks (timing runs)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout (rank 0)")
    return ap.parse_args(argv)


def uneven_split(total, ranks):
    """An uneven cut of `total` tokens: weights 3, 2, 4, 1, ... (a rank may get 0 tokens)."""
    weights = [(3, 2, 4, 1, 5, 2)[r % 6] for r in range(ranks)]
    lens = [total * w // sum(weights) for w in weights]
    lens[-1] += total - sum(lens)
    return lens


class Block(torch.nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.ln1 = torch.nn.LayerNorm(dim)
        self.wq = torch.nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wkv = torch.nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.wo = torch.nn.Linear(heads * self.head_dim, dim, bias=False)
        self.ln2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))
        self.capture = None  # a dict to fill with this step's attention tensors (checks)

    def forward(self, x, plan, mode, dtype):
        s = x.shape[0]
        h = self.ln1(x)
        q = self.wq(h).view(s, self.heads, self.head_dim)
        kv = self.wkv(h).view(s, 2, self.kv_heads, self.head_dim)
        k, v = kv[:, 0], kv[:, 1]  # strided views: uaa reads them in place
        if dtype != torch.float32:
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        o = uaa.torch.attention(q, k, v, plan, mode=mode)
        if self.capture is not None:
            c = self.capture
            c["q"], c["k"], c["v"], c["out"] = q.detach(), k.detach(), v.detach(), o.detach()
            for name, t in (("dq", q), ("dk", k), ("dv", v), ("dout", o)):
                t.register_hook(lambda g, name=name: c.__setitem__(name, g.detach().clone()))
        x = x + self.wo(o.to(x.dtype).reshape(s, self.heads * self.head_dim))
        return x + self.mlp(self.ln2(x))


def sinusoidal(positions, dim):
    """Fixed sinusoidal position encodings of global positions: [len(positions), dim]."""
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-np.log(10000.0) / dim))
    angles = positions.to(torch.float64)[:, None] * freq[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).to(torch.float32)


class TinyTransformer(torch.nn.Module):
    def __init__(self, vocab, dim, layers, heads, kv_heads):
        super().__init__()
        self.dim = dim
        self.tok = torch.nn.Embedding(vocab, dim)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, kv_heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, tokens, positions, plan, mode, dtype):
        x = self.tok(tokens) + sinusoidal(positions, self.dim)
        for b in self.blocks:
            x = b(x, plan, mode, dtype)
        return self.head(self.ln(x))


def make_data(args, total):
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens = torch.randint(0, args.vocab, (total + 1,), generator=g)
    return tokens[:-1], tokens[1:]  # inputs, next-token targets


def make_model(args):
    torch.manual_seed(args.seed)
    return TinyTransformer(args.vocab, args.dim, args.layers, args.heads, args.kv_heads)


class GradientSum:
    """The parameters' gradients live in one flat buffer (each p.grad a view of it, which autograd
    accumulates into); sum() adds it up over the ranks in place. Reduce-scatter then all-gather:
    every chunk is summed once, on one rank, so every rank ends with the same bits."""

    def __init__(self, model, mpi_comm):
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        P = mpi_comm.size
        self.comm = mpi_comm
        self.flat = torch.zeros((n + P - 1) // P * P)  # padded to a multiple of the ranks
        offset = 0
        for p in params:
            p.grad = self.flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
        self.chunk = np.empty(self.flat.numel() // P, np.float32)

    def zero(self):
        self.flat.zero_()

    def sum(self):
        if self.comm.size > 1:
            flat = self.flat.numpy()
            self.comm.Reduce_scatter_block(flat, self.chunk, op=MPI.SUM)
            self.comm.Allgather(self.chunk, flat)


def train(args, ucomm, mpi_comm, lens, capture_steps=()):
    """Trains on this rank's slice of the sequence; returns (global losses, step seconds, captures)
    where captures[step][layer] holds that layer's attention tensors of this rank."""
    rank, total = mpi_comm.rank, sum(lens)
    start = sum(lens[:rank])
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    plan = uaa.Plan.from_lengths(ucomm, lens, heads=args.heads, kv_heads=args.kv_heads,
                                 head_dim=args.dim // args.heads, causal=True, dtype=args.dtype)
    model = make_model(args)
    grads = GradientSum(model, mpi_comm)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    inputs, targets = make_data(args, total)
    inputs, targets = inputs[start:start + lens[rank]], targets[start:start + lens[rank]]
    positions = torch.arange(start, start + lens[rank])
    losses, seconds, captures = [], [], {}
    phases = {"forward": [], "backward": [], "allreduce": [], "optimizer": [], "uaa": []}
    for step in range(args.steps):
        mpi_comm.Barrier()
        t0 = time.perf_counter()
        in_uaa = uaa._uaa.call_seconds_total()  # time inside uaa's C++ calls (reported)
        capture = step in capture_steps
        for b in model.blocks:
            b.capture = {} if capture else None
        grads.zero()
        logits = model(inputs, positions, plan, args.mode, dtype)
        # This rank's share of the mean over all tokens (a rank with 0 tokens contributes 0, and
        # still runs its backward: the attention backward is collective).
        loss = F.cross_entropy(logits, targets, reduction="sum") / total
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        grads.sum()
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        seconds.append(t4 - t0)
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3,
                                    uaa._uaa.call_seconds_total() - in_uaa)):
            phases[key].append(dt)
        losses.append(mpi_comm.allreduce(float(loss.detach()), op=MPI.SUM))
        if capture:
            captures[step] = [b.capture for b in model.blocks]
    for b in model.blocks:
        b.capture = None
    train.phases = phases  # per step, this rank's (reported by run())
    return losses, seconds, captures


def gather_tokens(mpi_comm, t):
    """The tensors of all ranks concatenated along the token axis (dim 0), on every rank."""
    parts = mpi_comm.allgather(t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy())
    whole = torch.from_numpy(np.concatenate(parts, axis=0))
    return whole.view(torch.bfloat16) if t.dtype == torch.bfloat16 else whole


def bits(t):
    return t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


def same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def rerun_one_rank(args, self_comm, c):
    """One rank's uaa run of the gathered attention inputs: (out, dq, dk, dv)."""
    total = c["q"].shape[0]
    plan = uaa.Plan.from_lengths(self_comm, [total], heads=args.heads, kv_heads=args.kv_heads,
                                 head_dim=args.dim // args.heads, causal=True, dtype=args.dtype)
    q, k, v = (c[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = uaa.torch.attention(q, k, v, plan, mode=args.mode)
    out.backward(c["dout"])
    return out.detach(), q.grad, k.grad, v.grad


def run(args, mpi_comm=MPI.COMM_WORLD):
    """The whole example; returns the summary dict (on every rank)."""
    torch.set_num_threads(args.threads)
    uaa.set_num_threads(args.threads)
    P, rank = mpi_comm.size, mpi_comm.rank
    lens = [int(x) for x in args.lens.split(",")] if args.lens else uneven_split(args.seq, P)
    if len(lens) != P:
        raise SystemExit("--lens has %d entries for %d ranks" % (len(lens), P))
    ucomm = uaa.Communicator(mpi_comm)
    check = not args.no_reference
    capture_steps = set(range(args.steps)) if check else set()
    losses, seconds, captures = train(args, ucomm, mpi_comm, lens, capture_steps)
    warm = seconds[1:] if len(seconds) > 1 else seconds  # step 0 grows every buffer
    summary = {
        "ranks": P, "lens": lens, "steps": args.steps, "losses": losses,
        "step_seconds_median": float(np.median(warm)),
        "step_seconds_max_over_ranks": mpi_comm.allreduce(float(np.median(warm)), op=MPI.MAX),
        "step_seconds": seconds, "threads": args.threads, "kernel": uaa.kernel_name(),
        # median over steps 1.. of each phase, max over ranks
        "phase_seconds": {key: mpi_comm.allreduce(float(np.median(t[1:] if len(t) > 1 else t)),
                                                  op=MPI.MAX)
                          for key, t in train.phases.items()},
    }
    if not check:
        return summary

    # Gather every step's attention tensors (all ranks take part), then check on rank 0.
    gathered = {s: [{n: gather_tokens(mpi_comm, t) for n, t in layer.items()} for layer in layers]
                for s, layers in captures.items()}
    ok = True
    if rank == 0:
        self_comm = uaa.Communicator(MPI.COMM_SELF)
        ref_losses, _, ref_captures = train(args, self_comm, MPI.COMM_SELF, [sum(lens)], {0})
        dev = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
        summary["reference_losses"] = ref_losses
        summary["max_relative_loss_deviation"] = max(dev)
        # The attention layers, every step: P ranks against one rank on the same inputs.
        attention_bitwise = True
        for s, layers in gathered.items():
            for c in layers:
                out, dq, dk, dv = rerun_one_rank(args, self_comm, c)
                for name, mine in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
                    attention_bitwise &= same_bits(c[name], mine)
        summary["attention_bitwise_vs_one_rank"] = attention_bitwise
        # Step 0 against the 1-rank training's own tensors (reported only).
        summary["step0_attention_bitwise_vs_one_rank_training"] = all(
            same_bits(c[n], r[n]) for c, r in zip(gathered[0], ref_captures[0])
            for n in ("q", "k", "v", "out", "dout", "dq", "dk", "dv"))
        ok = attention_bitwise and max(dev) <= args.tolerance
    summary["ok"] = mpi_comm.bcast(ok, root=0)
    return mpi_comm.bcast(summary, root=0)


def main(argv=None):
    args = parse_args(argv)
    mpi_comm = MPI.COMM_WORLD
    summary = run(args, mpi_comm)
    if mpi_comm.rank == 0:
        if args.json:
            print(json.dumps(summary))
        else:
            print("tiny transformer: %d ranks, lens %s, %d layers, dim %d, heads %d/%d, %s, "
                  "kernel %s" % (summary["ranks"], summary["lens"], args.layers, args.dim,
                                 args.heads, args.kv_heads, args.dtype, summary["kernel"]))
            ref = summary.get("reference_losses")
            for i, loss in enumerate(summary["losses"]):
                line = "step %2d  loss %.7f  %.1f ms" % (i, loss, 1e3 * summary["step_seconds"][i])
                if ref:
                    line += "  1 rank %.7f  rel dev %.2e" % (ref[i], abs(loss - ref[i]) / abs(ref[i]))
                print(line)
            print("step time (median of steps 1.., max over ranks): %.1f ms (%s)"
                  % (1e3 * summary["step_seconds_max_over_ranks"],
                     ", ".join("%s %.1f" % (k, 1e3 * t) for k, t in summary["phase_seconds"].items())))
            if ref:
                print("largest relative loss deviation vs 1 rank: %.3e (limit %.0e)"
                      % (summary["max_relative_loss_deviation"], args.tolerance))
                print("attention outputs and input gradients bitwise those of 1 rank (every "
                      "layer, every step): %s" % summary["attention_bitwise_vs_one_rank"])
                print("step 0 attention tensors bitwise those of the 1-rank training: %s"
                      % summary["step0_attention_bitwise_vs_one_rank_training"])
                print("OK" if summary["ok"] else "FAILED")
    return 0 if summary.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
