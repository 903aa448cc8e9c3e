"""Strided views (head-major, padded, [S, B, H, D], broadcast heads), out= and lse= (written in
place, nothing else touched), return_lse with and without a plan that has it, and the plan's
properties."""

import numpy as np
import pytest
from conftest import P, RANK, assert_bitwise, gather_rows, mine, needs_torch, torch, uneven

import uaa

H, HKV, D = 4, 2, 16
SENTINEL = np.float32(-7.25)


def data(total, seed=3, batch=None):
    rng = np.random.default_rng(seed)
    lead = () if batch is None else (batch,)
    Q = rng.standard_normal(lead + (total, H, D), dtype=np.float32)
    K = rng.standard_normal(lead + (total, HKV, D), dtype=np.float32)
    V = rng.standard_normal(lead + (total, HKV, D), dtype=np.float32)
    return Q, K, V


@pytest.fixture(scope="module")
def setup(comm):
    total = 83
    lens = uneven(total)
    start, n = mine(lens)
    plan = uaa.Plan(comm, n, heads=H, kv_heads=HKV, head_dim=D, causal=True, return_lse=True)
    Q, K, V = data(total)
    q, k, v = (X[start:start + n] for X in (Q, K, V))
    out, lse = uaa.attention(q, k, v, plan, return_lse=True)  # the contiguous result
    return dict(plan=plan, start=start, n=n, Q=Q, K=K, V=V, out=out, lse=lse, total=total)


def head_major(X, start, n):
    """X's rows [start, start+n) as a view of a head-major [H, S, D] copy: [n, H, D] with token
    stride D and head stride S * D."""
    Xh = np.ascontiguousarray(X.transpose(1, 0, 2))
    return Xh[:, start:start + n].transpose(1, 0, 2)


def padded(x, extra_heads=1, extra_dim=5):
    """x inside a bigger buffer: [n, H + extra, D + extra] with the view in the corner."""
    buf = np.full((x.shape[0], x.shape[1] + extra_heads, x.shape[2] + extra_dim), SENTINEL,
                  np.float32)
    buf[:, :x.shape[1], :x.shape[2]] = x
    return buf, buf[:, :x.shape[1], :x.shape[2]]


def test_numpy_strided_inputs_and_out(setup):
    s = setup
    q = head_major(s["Q"], s["start"], s["n"])
    k = head_major(s["K"], s["start"], s["n"])
    _, v = padded(s["V"][s["start"]:s["start"] + s["n"]])
    if s["n"] > 1:  # (a 0-token rank's views are trivially contiguous)
        assert not q.flags.c_contiguous and not v.flags.c_contiguous
    obuf, o = padded(np.zeros_like(s["out"]), extra_heads=2, extra_dim=3)
    lbuf = np.full((s["n"], H + 3), SENTINEL, np.float32)
    r, lse = uaa.attention(q, k, v, s["plan"], out=o, lse=lbuf[:, :H], return_lse=True)
    assert r is o and lse.base is lbuf
    assert_bitwise(o, s["out"], "out (strided)")
    assert_bitwise(lbuf[:, :H], s["lse"], "lse (strided)")
    # Nothing outside the views was written.
    assert (obuf[:, H:] == SENTINEL).all() and (obuf[:, :, D:] == SENTINEL).all()
    assert (lbuf[:, H:] == SENTINEL).all()


def test_broadcast_heads_are_read_in_place(comm, setup):
    """A key/value head broadcast over the GQA heads (head stride 0) is a valid input view."""
    s = setup
    plan = uaa.Plan(comm, s["n"], heads=H, kv_heads=H, head_dim=D)
    k1 = s["K"][s["start"]:s["start"] + s["n"], :1]
    kb = np.broadcast_to(k1, (s["n"], H, D))
    q = s["Q"][s["start"]:s["start"] + s["n"]]
    a = uaa.attention(q, kb, kb, plan)
    b = uaa.attention(q, np.ascontiguousarray(kb), np.ascontiguousarray(kb), plan)
    assert_bitwise(a, b, "broadcast heads")


def test_batch_interleaved(comm, self_comm):
    """[S, B, H, D] memory seen as [B, S, H, D] (batch stride H*D, token stride B*H*D)."""
    B, total = 2, 59
    lens = uneven(total)
    start, n = mine(lens)
    Q, K, V = data(total, seed=4, batch=B)
    inter = [np.ascontiguousarray(X[:, start:start + n].transpose(1, 0, 2, 3)) for X in (Q, K, V)]
    views = [x.transpose(1, 0, 2, 3) for x in inter]  # [B, n, H, D], not contiguous
    plan = uaa.Plan(comm, n, heads=H, kv_heads=HKV, head_dim=D, batch=B, window=(5, 5))
    obuf = np.full((n, B, H, D), SENTINEL, np.float32)
    out = uaa.attention(*views, plan, out=obuf.transpose(1, 0, 2, 3))
    whole = gather_rows(out, axis=1)
    one = uaa.attention(Q, K, V, uaa.Plan(self_comm, total, heads=H, kv_heads=HKV, head_dim=D,
                                          batch=B, window=(5, 5)))
    assert_bitwise(whole, one, "batch-interleaved out")


@needs_torch
def test_torch_strided_views(setup):
    s = setup
    st, n = s["start"], s["n"]
    q = torch.from_numpy(np.ascontiguousarray(s["Q"].transpose(1, 0, 2)))[:, st:st + n].transpose(0, 1)
    kvbuf = torch.from_numpy(np.ascontiguousarray(
        np.stack([s["K"][st:st + n], s["V"][st:st + n]], axis=1)))  # [n, 2, HKV, D]
    k, v = kvbuf[:, 0], kvbuf[:, 1]
    if n > 1:
        assert not q.is_contiguous() and not k.is_contiguous()
    out, lse = uaa.attention(q, k, v, s["plan"], return_lse=True)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert_bitwise(out, s["out"], "torch strided out")
    assert_bitwise(lse, s["lse"], "torch lse")
    o = torch.empty(H, n, D).transpose(0, 1)
    assert uaa.attention(q, k, v, s["plan"], out=o) is o
    assert_bitwise(o, s["out"], "torch head-major out")


def test_return_lse_without_plan_lse(comm, setup):
    """A plan without return_lse still serves return_lse=True (through a twin plan made by
    Plan.from_lengths), bitwise the same; a plan with it serves calls that do not ask."""
    s = setup
    plain = uaa.Plan(comm, s["n"], heads=H, kv_heads=HKV, head_dim=D, causal=True)
    q, k, v = (X[s["start"]:s["start"] + s["n"]] for X in (s["Q"], s["K"], s["V"]))
    out, lse = uaa.attention(q, k, v, plain, return_lse=True)
    assert_bitwise(out, s["out"], "out")
    assert_bitwise(lse, s["lse"], "lse")
    assert_bitwise(uaa.attention(q, k, v, plain), s["out"], "out without lse")
    assert_bitwise(uaa.attention(q, k, v, s["plan"]), s["out"], "lse plan, no lse asked")


def test_low_level_forward_backward(comm):
    """uaa.forward / uaa.backward with the caller's arrays (saved and recompute), phase times."""
    total = 70
    lens = uneven(total)
    start, n = mine(lens)
    Q, K, V = data(total, seed=6)
    dO = np.random.default_rng(9).standard_normal(Q.shape, dtype=np.float32)
    plan = uaa.Plan(comm, n, heads=H, kv_heads=HKV, head_dim=D, return_lse=True)
    q, k, v, do = (X[start:start + n] for X in (Q, K, V, dO))
    out, lse = np.empty_like(q), np.empty((n, H), np.float32)
    saved = uaa.SavedForward()
    ws = uaa.Workspace()
    t = uaa.forward(plan, q, k, v, out, lse=lse, saved=saved, workspace=ws, times=True)
    assert saved.valid and saved.plan_fingerprint == plan.fingerprint
    assert set(t) >= {"handshake", "attention", "total"} and t["total"] >= t["attention"] >= 0
    assert ws.bytes_reserved > 0 or P == 1 or n == 0
    grads = []
    for sv in (saved, None):
        dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
        bt = uaa.backward(plan, q, k, v, out, lse, do, dq, dk, dv, saved=sv, times=True)
        assert bt["total"] >= bt["kernel"] >= 0
        grads.append((dq, dk, dv))
    for a, b in zip(*grads):
        assert_bitwise(a, b, "saved vs recompute")


def test_plan_properties(comm):
    lens = uneven(101)
    start, n = mine(lens)
    kw = dict(heads=6, kv_heads=3, head_dim=32, causal=True, window=(20, None),
              docs=[40, 0, 61], batch=2, dtype="bf16", return_lse=True)
    plan = uaa.Plan(comm, n, **kw)
    same = uaa.Plan.from_lengths(comm, lens, **kw)
    cu = uaa.Plan.from_lengths(comm, lens, **{**kw, "docs": None, "cu_seqlens": [0, 40, 40, 101]})
    assert plan.fingerprint == same.fingerprint == cu.fingerprint
    assert (plan.ranks, plan.rank) == (P, RANK)
    assert plan.q_lens == tuple(lens) and plan.kv_lens == tuple(lens)
    assert (plan.q_tokens, plan.kv_tokens, plan.q_total, plan.kv_total) == (n, n, 101, 101)
    assert (plan.heads, plan.kv_heads, plan.head_dim, plan.batch) == (6, 3, 32, 2)
    assert plan.dtype == "bfloat16" and plan.causal and plan.return_lse
    assert plan.window == (20, -1)  # as given (causal caps the right side at 0 when it runs)
    assert plan.documents == ((40, 0, 61), (40, 0, 61))
    assert plan.scale == pytest.approx(1 / np.sqrt(32))
    assert plan.strategy == "uaa" and plan.backward_order == "canonical"
    assert not plan.allow_mixed_kernels
    assert plan.communicator is comm
    assert repr(plan) == plan.describe() and "3 documents" in repr(plan)
    rows = sum((w[2] - w[0]) * 101 + w[3] - w[1] for w in (plan.work(r) for r in range(P)))
    assert rows == 2 * 6 * 101  # the ranks' work covers every (head, row) of the batch once
    lo, hi = plan.q_head_range(RANK)
    assert 0 <= lo <= hi <= 12
    for x in (plan.bytes_sent, plan.bytes_received, plan.saved_bytes, plan.staging_bytes,
              plan.backward_bytes_sent(), plan.backward_bytes_received(saved=False)):
        assert isinstance(x, int) and x >= 0
    assert plan.backward_bytes_sent(saved=False) >= plan.backward_bytes_sent(saved=True)
    for dt in ("float32", "f32", np.float32) + ((torch.float32,) if torch else ()):
        assert uaa.Plan.from_lengths(comm, lens, heads=2, head_dim=8, dtype=dt).dtype == "float32"
    if torch is not None:
        assert uaa.Plan.from_lengths(comm, lens, heads=2, head_dim=8,
                                     dtype=torch.bfloat16).dtype == "bfloat16"
    with pytest.raises(AttributeError):
        plan.heads = 3
