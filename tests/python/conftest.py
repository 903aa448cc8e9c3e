"""Shared helpers of the Python tests. They run under mpirun (ctest: tests/python/CMakeLists.txt):
every rank runs every test in the same order; a test's collective calls meet on every rank.

Data: each test draws the *global* arrays from one seed on every rank and takes this rank's slice
(no exchange of inputs). References: plain PyTorch attention in float64 on the whole sequence
(masks for causal, windows and documents built from global positions), and uaa itself on one rank
(a plan over MPI.COMM_SELF holding the whole sequence) for the bitwise checks.
"""

import os
import sys

import numpy as np
import pytest
from mpi4py import MPI

import uaa

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the torch tests skip
    torch = None

WORLD = MPI.COMM_WORLD
P = WORLD.size
RANK = WORLD.rank

needs_torch = pytest.mark.skipif(torch is None, reason="PyTorch is not installed")
needs_ranks = lambda n: pytest.mark.skipif(P < n, reason="needs %d ranks" % n)  # noqa: E731

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples", "python"))


@pytest.fixture(scope="session")
def comm():
    return uaa.Communicator.world()


@pytest.fixture(scope="session")
def self_comm():
    return uaa.Communicator(MPI.COMM_SELF)


@pytest.fixture(autouse=True)
def in_step():
    """Every rank starts and ends each test together."""
    WORLD.Barrier()
    yield
    WORLD.Barrier()


def uneven(total, pattern=(3, 0, 5, 2), ranks=P):
    """`total` tokens cut over the ranks by weights (rank 1 holds 0 tokens when ranks > 2)."""
    if ranks == 1:
        return [total]
    weights = [pattern[r % len(pattern)] for r in range(ranks)]
    if ranks == 2:
        weights = [3, 5]
    lens = [total * w // sum(weights) for w in weights]
    lens[-1] += total - sum(lens)
    return lens


def mine(lens, rank=RANK):
    """(start, count) of this rank's slice."""
    return sum(lens[:rank]), lens[rank]


def gather_rows(local, axis):
    """This rank's array of every rank, concatenated along `axis` (NumPy), on every rank."""
    return np.concatenate(WORLD.allgather(np.ascontiguousarray(local)), axis=axis)


def as_numpy(t):
    """A torch tensor (bf16 as its bits, int16) or an array, as NumPy."""
    if torch is not None and isinstance(t, torch.Tensor):
        t = t.detach()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy()
        return t.contiguous().numpy()
    return np.asarray(t)


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view({2: np.int16, 4: np.int32, 8: np.int64}[a.dtype.itemsize])


def assert_bitwise(a, b, what=""):
    a, b = bits(as_numpy(a)), bits(as_numpy(b))
    assert a.shape == b.shape, "%s: shapes %s vs %s" % (what, a.shape, b.shape)
    diff = int(np.count_nonzero(a != b))
    assert diff == 0, "%s: %d of %d elements differ from the 1-rank run" % (what, diff, a.size)


def doc_ranges(docs, total):
    """[(start, end)] of each document; one document of `total` when docs is None."""
    docs = [total] if not docs else docs
    ends = np.cumsum(docs)
    return [(int(e - n), int(e)) for n, e in zip(docs, ends)]


def visible(q_total, kv_total, q_docs=None, kv_docs=None, causal=False, window=(-1, -1)):
    """[Sq, Skv] bool: which keys each query sees (uaa's conventions: per document, bottom-right
    aligned causal and window, -1 = unbounded, causal caps the right side at 0)."""
    mask = np.zeros((q_total, kv_total), dtype=bool)
    qd = doc_ranges(q_docs, q_total)
    kd = doc_ranges(kv_docs if kv_docs else q_docs, kv_total)
    left, right = window
    for (q0, q1), (k0, k1) in zip(qd, kd):
        i = np.arange(q1 - q0)[:, None] + ((k1 - k0) - (q1 - q0))  # aligned positions
        j = np.arange(k1 - k0)[None, :]
        m = np.ones((q1 - q0, k1 - k0), dtype=bool)
        if causal:
            m &= j <= i
        if left >= 0:
            m &= j >= i - left
        if right >= 0:
            m &= j <= i + right
        mask[q0:q1, k0:k1] = m
    return mask


def reference(q, k, v, mask, scale=None):
    """float64 attention (torch, differentiable) of whole sequences: q [B, Sq, Hq, D], k, v
    [B, Skv, Hkv, D], mask [Sq, Skv]. Returns (out [B, Sq, Hq, D], lse [B, Sq, Hq]); rows that
    see no key give 0 and -inf."""
    B, Sq, Hq, D = q.shape
    g = Hq // k.shape[2]
    scale = 1.0 / np.sqrt(D) if scale is None else scale
    kk = k.repeat_interleave(g, dim=2)
    vv = v.repeat_interleave(g, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    m = torch.from_numpy(mask)[None, None]
    s = s.masked_fill(~m, float("-inf"))
    mx = s.amax(dim=-1, keepdim=True)
    mx = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx)).detach()
    e = torch.exp(s - mx)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = torch.einsum("bhij,bjhd->bihd", p, vv)
    lse = (torch.log(denom) + mx).squeeze(-1).permute(0, 2, 1)
    return out, lse
