"""uaa.attention and uaa.torch.attention against float64 PyTorch attention on the gathered
sequence and bitwise against one rank: NumPy and torch inputs, fp32 and bf16, GQA, causal,
cross attention, windows, packed documents, batches, uneven lengths including 0."""

import numpy as np
import pytest
from conftest import (
    P,
    RANK,
    WORLD,
    as_numpy,
    assert_bitwise,
    gather_rows,
    mine,
    needs_torch,
    reference,
    torch,
    uneven,
    visible,
)

import uaa

CASES = {
    "mha": dict(q_total=67, heads=4, kv_heads=4, dim=16),
    "gqa_causal": dict(q_total=100, heads=6, kv_heads=2, dim=32, causal=True),
    "cross_causal": dict(q_total=50, kv_total=70, heads=4, kv_heads=2, dim=16, causal=True),
    "window_docs": dict(q_total=100, heads=3, kv_heads=1, dim=16, window=(8, 3),
                        docs=[30, 1, 40, 29]),
    "cross_docs_batch": dict(q_total=60, kv_total=80, heads=4, kv_heads=4, dim=8, causal=True,
                             docs=([20, 0, 40], [30, 10, 40]), batch=2),
    "batch_window_causal": dict(q_total=90, heads=2, kv_heads=1, dim=64, batch=3, causal=True,
                                window=(16, -1)),
}


class Case:
    """The global data of a case (identical on every rank) and this rank's slices."""

    def __init__(self, name, seed=0):
        c = CASES[name]
        self.name = name
        self.q_total = c["q_total"]
        self.kv_total = c.get("kv_total", self.q_total)
        self.B = c.get("batch", 1)
        self.heads, self.kv_heads, self.dim = c["heads"], c["kv_heads"], c["dim"]
        docs = c.get("docs")
        if docs is not None and isinstance(docs[0], list):
            self.q_docs, self.kv_docs = docs
        else:
            self.q_docs, self.kv_docs = docs, None
        self.kw = dict(heads=self.heads, kv_heads=self.kv_heads, head_dim=self.dim,
                       causal=c.get("causal", False), window=c.get("window"), docs=docs,
                       batch=self.B)
        self.lens = uneven(self.q_total)
        self.kv_lens = self.lens if self.kv_total == self.q_total else uneven(
            self.kv_total, pattern=(1, 4, 0, 3))
        rng = np.random.default_rng(seed)
        f = lambda s, h: rng.standard_normal((self.B, s, h, self.dim), dtype=np.float32)  # noqa
        self.Q, self.K, self.V = f(self.q_total, self.heads), f(self.kv_total, self.kv_heads), \
            f(self.kv_total, self.kv_heads)
        self.dO = f(self.q_total, self.heads)
        self.mask = visible(self.q_total, self.kv_total, self.q_docs, self.kv_docs,
                            self.kw["causal"], self.kw["window"] or (-1, -1))

    def local(self, X, kv=False):
        """This rank's slice: [S, H, D] for one sequence, else [B, S, H, D]."""
        start, n = mine(self.kv_lens if kv else self.lens)
        x = X[:, start:start + n]
        return x[0] if self.B == 1 else x

    def whole(self, X):
        return X[0] if self.B == 1 else X

    def plan(self, comm, **extra):
        start, n = mine(self.lens)
        _, nkv = mine(self.kv_lens)
        return uaa.Plan(comm, n, nkv, **self.kw, **extra)

    def one_rank_plan(self, self_comm, **extra):
        return uaa.Plan.from_lengths(self_comm, [self.q_total], [self.kv_total], **self.kw, **extra)

    def gather(self, x):
        """Every rank's [.., S, H, D] (or lse [.., S, H]) output, whole along the token axis."""
        return gather_rows(as_numpy(x), axis=0 if self.B == 1 else 1)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(b)
    assert np.array_equal(finite, np.isfinite(a)), "non-finite values differ"
    if not finite.any():
        return 0.0
    return float(np.abs(a[finite] - b[finite]).max() / max(1.0, np.abs(b[finite]).max()))


@pytest.mark.parametrize("name", list(CASES))
def test_numpy(comm, self_comm, name):
    c = Case(name)
    plan = c.plan(comm)
    assert plan.q_lens == tuple(c.lens) and plan.kv_lens == tuple(c.kv_lens)
    q, k, v = c.local(c.Q), c.local(c.K, kv=True), c.local(c.V, kv=True)
    out, lse = uaa.attention(q, k, v, plan, return_lse=True)
    assert isinstance(out, np.ndarray) and out.shape == q.shape and out.dtype == np.float32
    assert lse.shape == q.shape[:-1]
    whole_out, whole_lse = c.gather(out), c.gather(lse)
    # float64 reference on the whole sequence.
    if torch is not None:
        t = lambda x: torch.from_numpy(x.astype(np.float64))  # noqa: E731
        ref_out, ref_lse = reference(t(c.Q), t(c.K), t(c.V), c.mask)
        assert rel_err(whole_out, c.whole(ref_out.numpy())) < 3e-6
        assert rel_err(whole_lse, c.whole(ref_lse.numpy())) < 3e-6
    # Bitwise: one rank running the whole sequence.
    one_out, one_lse = uaa.attention(c.whole(c.Q), c.whole(c.K), c.whole(c.V),
                                     c.one_rank_plan(self_comm), return_lse=True)
    assert_bitwise(whole_out, one_out, "out")
    assert_bitwise(whole_lse, one_lse, "lse")


@needs_torch
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_torch_autograd(comm, self_comm, name, dtype):
    import uaa.torch

    c = Case(name, seed=1)
    tdt = getattr(torch, dtype)
    plan = c.plan(comm, dtype=dtype)
    leaf = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(tdt).requires_grad_()  # noqa
    q, k, v = leaf(c.local(c.Q)), leaf(c.local(c.K, kv=True)), leaf(c.local(c.V, kv=True))
    out = uaa.torch.attention(q, k, v, plan)
    assert out.dtype == tdt and out.shape == q.shape and out.requires_grad
    dO = torch.from_numpy(np.ascontiguousarray(c.local(c.dO)))
    (out.float() * dO).sum().backward()
    got = {n: c.gather(x) for n, x in (("out", out), ("dq", q.grad), ("dk", k.grad),
                                       ("dv", v.grad))}
    # float64 autograd on the whole sequence, from the same (rounded) inputs.
    Q, K, V = (torch.from_numpy(x).to(tdt).double().requires_grad_() for x in (c.Q, c.K, c.V))
    ref_out, _ = reference(Q, K, V, c.mask)
    (ref_out * torch.from_numpy(c.dO).double()).sum().backward()
    tol = 3e-6 if dtype == "float32" else 1.5e-2  # measured: <= 4.1e-7, 2.8e-3
    gtol = 1e-5 if dtype == "float32" else 2.5e-2  # measured: <= 8.5e-7, 6.2e-3
    for n, ref, t in (("out", ref_out.detach(), tol), ("dq", Q.grad, gtol), ("dk", K.grad, gtol),
                      ("dv", V.grad, gtol)):
        mine_ = got[n]
        if dtype == "bfloat16":
            mine_ = torch.from_numpy(mine_).view(torch.bfloat16).double().numpy()
        err = rel_err(mine_, c.whole(ref.numpy()))
        assert err < t, "%s: relative error %.3g vs float64 (limit %g)" % (n, err, t)
    # Bitwise: the same on one rank.
    Q1, K1, V1 = (torch.from_numpy(np.ascontiguousarray(c.whole(x))).to(tdt).requires_grad_()
                  for x in (c.Q, c.K, c.V))
    out1 = uaa.torch.attention(Q1, K1, V1, c.one_rank_plan(self_comm, dtype=dtype))
    (out1.float() * torch.from_numpy(np.ascontiguousarray(c.whole(c.dO)))).sum().backward()
    for n, t in (("out", out1), ("dq", Q1.grad), ("dk", K1.grad), ("dv", V1.grad)):
        assert_bitwise(got[n], t, n)


@needs_torch
@pytest.mark.parametrize("name", ["gqa_causal", "cross_docs_batch"])
def test_torch_recompute_equals_saved(comm, name):
    import uaa.torch

    c = Case(name, seed=2)
    plan = c.plan(comm)  # without return_lse: uaa.torch uses its lse twin
    assert not plan.return_lse
    grads = {}
    for mode in ("saved", "recompute"):
        q, k, v = (torch.from_numpy(np.ascontiguousarray(c.local(X, kv=kv))).requires_grad_()
                   for X, kv in ((c.Q, False), (c.K, True), (c.V, True)))
        out = uaa.torch.attention(q, k, v, plan, mode=mode)
        out.backward(torch.from_numpy(np.ascontiguousarray(c.local(c.dO))))
        grads[mode] = (out.detach(), q.grad, k.grad, v.grad)
    for a, b, n in zip(grads["saved"], grads["recompute"], ("out", "dq", "dk", "dv")):
        assert_bitwise(a, b, n)
    # SavedForwards go back to the plan's pool after the backward.
    assert len(plan._lse_plan()._saved_pool) >= 1


def test_uneven_extremes(comm, self_comm):
    """All tokens on the last rank, every other rank 0; and 0 tokens everywhere."""
    total, H, D = 37, 3, 8
    lens = [0] * (P - 1) + [total]
    rng = np.random.default_rng(5)
    Q, K, V = (rng.standard_normal((total, H, D), dtype=np.float32) for _ in range(3))
    start, n = mine(lens)
    plan = uaa.Plan(comm, n, heads=H, head_dim=D, causal=True)
    out = uaa.attention(Q[start:start + n], K[start:start + n], V[start:start + n], plan)
    one = uaa.attention(Q, K, V, uaa.Plan(self_comm, total, heads=H, head_dim=D, causal=True))
    assert_bitwise(gather_rows(out, 0), one, "out")
    empty = uaa.Plan(comm, 0, heads=H, head_dim=D)
    z = np.zeros((0, H, D), np.float32)
    assert uaa.attention(z, z, z, empty).shape == (0, H, D)
