"""Every error class, raised on every rank with the failing rank's C++ message, and the
interpreter survives: bad arrays (dtype, strides, shape, type, read-only, overlap), ranks that
disagree, unsupported requests, a failed allocation, a deadline, a poisoned communicator. After each
(but the last two, which poison their own communicator) the same communicator keeps working.

Outcomes are compared with an all-gather *after* each call, so that a rank that does not fail as
expected fails its test without leaving the others waiting in a collective."""

import ctypes
import resource
import time

import numpy as np
import pytest
from conftest import P, RANK, WORLD, mine, needs_ranks, needs_torch, torch, uneven
from mpi4py import MPI

import uaa
from uaa import _uaa

H, D = 4, 16
BAD = P - 1  # the rank that misbehaves (it holds tokens: see conftest.uneven)
SENTINEL = np.float32(-3.5)


def outcome(fn):
    """The exception fn() raised (any kind: a rank that raises something else than expected must
    still reach the all-gather that compares outcomes), or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def check_everywhere(cls, fn, fragments=(), bad=BAD, same_message=True):
    """fn() raises cls on every rank, with the same message naming rank `bad`."""
    e = outcome(fn)
    got = WORLD.allgather((type(e).__name__ if e is not None else None,
                           str(e) if e is not None else None))
    names = [g[0] for g in got]
    assert names == [cls.__name__] * P, "expected %s on every rank, got %s" % (cls.__name__, got)
    msgs = {g[1] for g in got}
    assert not same_message or len(msgs) == 1, "ranks raised different messages: %s" % msgs
    msg = str(e)
    assert isinstance(e, uaa.Error) and isinstance(e, cls) and e.code == cls.code
    if bad is not None:
        assert "rank %d" % bad in msg, msg
    for f in fragments:
        assert f in msg, "%r not in %r" % (f, msg)
    return e


@pytest.fixture(scope="module")
def ctx(comm):
    lens = uneven(53)
    start, n = mine(lens)
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((n, H, D), dtype=np.float32) for _ in range(3))
    plan = uaa.Plan(comm, n, heads=H, head_dim=D)
    return dict(lens=lens, n=n, q=q, k=k, v=v, plan=plan, comm=comm)


def usable(c):
    """The communicator still works: a good call on it succeeds on every rank."""
    out = uaa.attention(c["q"], c["k"], c["v"], c["plan"])
    assert out.shape == c["q"].shape


def bad_q(c):
    return {
        "tokens": (c["q"][:-1], "q.tokens"),
        "float64": (c["q"].astype(np.float64), "NumPy dtype float64"),
        "head_dim_stride": (np.repeat(c["q"], 2, axis=2)[..., ::2], "head_dim stride of 2"),
        "list": (c["q"].tolist(), "is a list"),
        "ndim": (c["q"].reshape(c["n"], -1), "has shape"),
        "negative_strides": (c["q"][::-1], "must be >= 0"),
        "heads": (np.ascontiguousarray(c["q"][:, :2]), "q.heads 2"),
    }


@pytest.mark.parametrize("variant", ["tokens", "float64", "head_dim_stride", "list", "ndim",
                                     "negative_strides", "heads"])
def test_bad_q_is_an_error_on_every_rank(ctx, variant):
    q, fragment = bad_q(ctx)[variant] if RANK == BAD else (ctx["q"], "")
    out = np.full_like(ctx["q"], SENTINEL)
    e = check_everywhere(uaa.InvalidArgumentError, lambda: uaa.attention(
        q, ctx["k"], ctx["v"], ctx["plan"], out=out), ())
    if RANK == BAD:
        assert fragment in str(e)
    assert isinstance(e, ValueError)  # InvalidArgumentError is also a ValueError
    assert (out == SENTINEL).all(), "out was written by a call that failed"
    usable(ctx)


def test_bad_out(ctx):
    c = ctx
    ro = np.empty_like(c["q"])
    ro.setflags(write=False)
    for out, fragment in ((ro, "read-only"), (c["q"], "out overlaps q")):
        o = out if RANK == BAD else np.empty_like(c["q"])
        e = check_everywhere(uaa.InvalidArgumentError,
                             lambda: uaa.attention(c["q"], c["k"], c["v"], c["plan"], out=o))
        assert fragment in str(e)
    lse = np.empty((c["n"] + 1, H), np.float32) if RANK == BAD else None
    check_everywhere(uaa.InvalidArgumentError, lambda: uaa.attention(
        c["q"], c["k"], c["v"], c["plan"], lse=lse, return_lse=True), ["lse has shape"])
    usable(c)


def test_bad_batch(comm, ctx):
    c = ctx
    plan = uaa.Plan(comm, c["n"], heads=H, head_dim=D, batch=2)
    q2 = np.stack([c["q"], c["q"]])
    k2, v2 = np.stack([c["k"], c["k"]]), np.stack([c["v"], c["v"]])
    variants = [(np.stack([c["q"]] * 3), "batch 3 but the plan has batch 2"),
                (np.broadcast_to(c["q"], (2,) + c["q"].shape), "batch stride of 0"),
                (c["q"], "but the plan has batch 2: pass [B, S, H, D]")]
    for bad, fragment in variants:
        q = bad if RANK == BAD else q2
        check_everywhere(uaa.InvalidArgumentError, lambda: uaa.attention(q, k2, v2, plan),
                         [fragment])
    uaa.attention(q2, k2, v2, plan)


@needs_torch
def test_bad_torch_tensors(ctx):
    import uaa.torch

    c = ctx
    t = lambda x: torch.from_numpy(x)  # noqa: E731
    q, k, v = t(c["q"]), t(c["k"]), t(c["v"])
    variants = [
        (lambda: uaa.attention(q.half() if RANK == BAD else q, k, v, c["plan"]), "torch.float16"),
        (lambda: uaa.attention(q.bfloat16() if RANK == BAD else q, k, v, c["plan"]),
         "q.dtype bf16 but the plan has f32"),
        (lambda: uaa.attention(q, k, v, c["plan"], out=torch.empty(q.shape, requires_grad=RANK == BAD)),
         "requires grad"),
        (lambda: uaa.torch.attention(c["q"] if RANK == BAD else q.requires_grad_(), k, v, c["plan"]),
         "uaa.torch.attention takes torch tensors; q is a ndarray"),
    ]
    for fn, fragment in variants:
        check_everywhere(uaa.InvalidArgumentError, fn, [fragment])
    # A gradient buffer of the wrong shape in a backward.
    plan = c["plan"]._lse_plan()
    out, lse = uaa.attention(c["q"], c["k"], c["v"], plan, return_lse=True)
    dq = np.empty((c["n"] + 1, H, D), np.float32) if RANK == BAD else np.empty_like(c["q"])
    check_everywhere(uaa.InvalidArgumentError, lambda: uaa.backward(
        plan, c["q"], c["k"], c["v"], out, lse, c["q"], dq, np.empty_like(c["k"]),
        np.empty_like(c["v"])), ["dq.tokens"])
    usable(c)


@needs_ranks(2)
def test_mismatch(comm, ctx):
    c = ctx
    other = uaa.Plan.from_lengths(comm, c["lens"], heads=H, head_dim=D, causal=True)
    plan = other if RANK == 0 else c["plan"]
    check_everywhere(uaa.MismatchError, lambda: uaa.attention(c["q"], c["k"], c["v"], plan),
                     bad=None)
    check_everywhere(uaa.MismatchError, lambda: uaa.Plan(comm, c["n"], heads=H + (RANK == 0),
                                                         head_dim=D), bad=None)
    usable(c)


def test_unsupported(comm, ctx):
    c = ctx
    check_everywhere(uaa.UnsupportedError, lambda: uaa.Plan(
        comm, c["n"], heads=H, head_dim=D, docs=[20, 33], strategy="allgather_kv"),
        ["strateg"], bad=None)
    ag = uaa.Plan(comm, c["n"], heads=H, head_dim=D, strategy="allgather_kv", return_lse=True)
    out, lse = uaa.attention(c["q"], c["k"], c["v"], ag, return_lse=True)  # forward is fine
    e = check_everywhere(uaa.UnsupportedError, lambda: uaa.forward(
        ag, c["q"], c["k"], c["v"], out, lse=lse, saved=uaa.SavedForward()), ["SavedForward"],
        bad=0)
    assert isinstance(e, NotImplementedError)
    check_everywhere(uaa.UnsupportedError, lambda: uaa.backward(
        ag, c["q"], c["k"], c["v"], out, lse, c["q"], np.empty_like(c["q"]),
        np.empty_like(c["k"]), np.empty_like(c["v"])), ["backward needs the uaa strategy"], bad=0)
    usable(c)


def vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def test_out_of_memory(comm):
    """The last rank cannot allocate its workspace (its address space limited to a quarter of what
    the call needs beyond what it has): OutOfMemoryError on every rank, outputs untouched, and the
    communicator keeps working."""
    heads, dim = 8, 128
    # The last rank holds 48 tokens but computes 8/P heads of the whole sequence: ~128 MB of
    # staging, far beyond any free block of its heap (which would serve it under any limit).
    lens = [8192 * P // max(P - 1, 1)] * P
    lens[BAD] = 48 if P > 1 else 4096
    start, n = mine(lens)
    plan = uaa.Plan.from_lengths(comm, lens, heads=heads, head_dim=dim)
    staging = plan.staging_bytes
    q = np.empty((n, heads, dim), np.float32)  # never read by a call that fails: left untouched
    out = np.full((n, heads, dim), SENTINEL, np.float32)
    ws = uaa.Workspace()  # fresh: the call must allocate
    limited, saved = False, resource.getrlimit(resource.RLIMIT_AS)
    if RANK == BAD and staging >= 1 << 26:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        limit = vm_bytes() + staging // 4
        if saved[0] == resource.RLIM_INFINITY or limit < saved[0]:
            resource.setrlimit(resource.RLIMIT_AS, (limit, saved[1]))
            limited = True
    ready = WORLD.allreduce(int(RANK != BAD or limited), op=MPI.MIN)
    if not ready:
        pytest.skip("could not lower RLIMIT_AS (staging %d bytes)" % staging)
    try:
        e = outcome(lambda: uaa.forward(plan, q, q, q, out, workspace=ws))
    finally:
        if limited:
            resource.setrlimit(resource.RLIMIT_AS, saved)
    got = WORLD.allgather(type(e).__name__ if e else None)
    assert got == ["OutOfMemoryError"] * P, got
    assert "could not allocate" in str(e) and "rank %d" % BAD in str(e)
    assert isinstance(e, MemoryError)
    assert (out == SENTINEL).all()
    del q, out, ws
    small = uaa.Plan(comm, 3, heads=2, head_dim=8)
    z = np.ones((3, 2, 8), np.float32)
    uaa.attention(z, z, z, small)


@needs_ranks(2)
def test_timeout_then_comm_failure():
    """A rank that arrives late: the others time out naming it; the late one gets the same error
    from the failure notice; the poisoned communicator then refuses every call (comm_failure)."""
    tc = uaa.Communicator(MPI.COMM_WORLD, timeout=1.0)
    lens = uneven(40)
    start, n = mine(lens)
    plan = uaa.Plan.from_lengths(tc, lens, heads=2, head_dim=8)
    x = np.ones((n, 2, 8), np.float32)
    if RANK == BAD:
        time.sleep(2.5)
    seconds = []

    def late_call():
        t0 = time.monotonic()
        try:
            uaa.attention(x, x, x, plan)
        finally:
            seconds.append(time.monotonic() - t0)

    e = check_everywhere(uaa.TimeoutError, late_call, ["timed out after",
                                                       "no data from rank(s) %d" % BAD], bad=None)
    assert isinstance(e, TimeoutError)  # also the built-in TimeoutError
    # The waiting ranks gave up at the deadline; the late one learned it at once (the notice).
    waited = WORLD.allgather(seconds[0])
    assert all(0.9 < w < 2.4 for r, w in enumerate(waited) if r != BAD), waited
    assert waited[BAD] < 0.9, waited
    e = check_everywhere(uaa.CommFailureError, lambda: uaa.attention(x, x, x, plan),
                         ["this communicator is unusable"], bad=None, same_message=False)
    assert "rank %d:" % RANK in str(e)  # each rank says it refuses, and why
    # Other communicators are unaffected.
    world_plan = uaa.Plan.from_lengths(uaa.Communicator.world(), lens, heads=2, head_dim=8)
    uaa.attention(x, x, x, world_plan)


@pytest.mark.parametrize("code", sorted(uaa.ERROR_CLASSES))
def test_every_code_maps_to_its_class(code):
    """uaa::Error(code) thrown in C++ arrives as the class of its code (internal included, which
    no valid program provokes), message intact."""
    with pytest.raises(uaa.ERROR_CLASSES[code]) as ei:
        _uaa._test_raise(code, "rank %d: some message" % RANK)
    assert ei.value.code == code and str(ei.value) == "rank %d: some message" % RANK
    assert ei.value.message == str(ei.value)
    assert isinstance(ei.value, uaa.Error) and isinstance(ei.value, RuntimeError)


@pytest.fixture(scope="module")
def quick_comm():
    """A communicator of its own with a short deadline: a rank left waiting fails fast, and a
    timeout poisons this one alone."""
    return uaa.Communicator(MPI.COMM_WORLD, timeout=10)


# Arguments that one rank gets wrong in Plan(...): caught by the Python conversions, by the C++
# binding's parsing, and by pybind11's own (an integer beyond int64).
BAD_PLAN_ARGUMENTS = {
    "heads_text": (dict(heads="four"), "heads"),
    "window_triple": (dict(window=(1, 2, 3)), "window"),
    "docs_text": (dict(docs="abc"), "docs"),
    "dtype": (dict(dtype="float16"), "float16"),
    "strategy": (dict(strategy="fastest"), "fastest"),
    "backward_order": (dict(backward_order="sorted"), "sorted"),
    "docs_and_cu_seqlens": (dict(docs=[53], cu_seqlens=[0, 53]), "not both"),
    "huge_head_dim": (dict(head_dim=2 ** 70), "head_dim"),
}


@pytest.mark.parametrize("variant", sorted(BAD_PLAN_ARGUMENTS))
def test_bad_plan_argument_on_one_rank(quick_comm, ctx, variant):
    """Plan(...) is collective: an argument only one rank gets wrong is an InvalidArgumentError
    on every rank naming that rank, never an exception on that rank alone while the others wait
    for the deadline."""
    bad, fragment = BAD_PLAN_ARGUMENTS[variant]
    kw = dict(heads=H, head_dim=D)
    if RANK == BAD:
        kw.update(bad)
    check_everywhere(uaa.InvalidArgumentError, lambda: uaa.Plan(quick_comm, ctx["n"], **kw),
                     ["uaa::Plan::create: rank %d" % BAD, fragment])
    # The communicator is not poisoned: a good plan follows on every rank.
    assert uaa.Plan(quick_comm, ctx["n"], heads=H, head_dim=D).q_tokens == ctx["n"]
