"""uaa — Ulysses Anything Attention from Python: sequence-parallel attention over MPI for any
sequence length and head count, with no padding, bitwise equal to one process running it all.

Run under ``mpirun``; every rank holds its own slice of the sequence (any length, 0 included)::

    from mpi4py import MPI
    import numpy as np
    import uaa

    comm = uaa.Communicator.world()            # duplicates MPI.COMM_WORLD (collective)
    s = 100 + 37 * comm.rank                   # this rank's tokens
    plan = uaa.Plan(comm, s, heads=24, kv_heads=8, head_dim=128, causal=True)   # collective
    q = np.random.rand(s, 24, 128).astype(np.float32)
    k = np.random.rand(s, 8, 128).astype(np.float32)
    v = np.random.rand(s, 8, 128).astype(np.float32)
    out = uaa.attention(q, k, v, plan)         # collective; [s, 24, 128]

Arguments are NumPy arrays (float32) or PyTorch CPU tensors (torch.float32 or torch.bfloat16;
NumPy has no bfloat16), shaped ``[S, H, D]`` or ``[B, S, H, D]`` with any strides whose last axis
is contiguous. Nothing is copied, and the GIL is released during each call. For autograd use
:func:`uaa.torch.attention`. Every failure is a :class:`uaa.Error` raised alike on every rank.
"""

import operator as _operator
import sys as _sys

import numpy as _np
from mpi4py import MPI as _MPI  # initializes MPI (MPI_Init_thread) unless the program did

from . import _uaa
from ._version import __version__
from .errors import (  # noqa: F401 (re-exported)
    ERROR_CLASSES,
    CommFailureError,
    Error,
    InternalError,
    InvalidArgumentError,
    MismatchError,
    OutOfMemoryError,
    TimeoutError,
    UnsupportedError,
)

__all__ = [
    "Communicator",
    "Plan",
    "attention",
    "forward",
    "backward",
    "SavedForward",
    "Workspace",
    "set_num_threads",
    "num_threads",
    "kernel_name",
    "backward_kernel_name",
    "mpi_library_version",
    "Error",
    "InvalidArgumentError",
    "MismatchError",
    "UnsupportedError",
    "CommFailureError",
    "TimeoutError",
    "InternalError",
    "OutOfMemoryError",
]

SavedForward = _uaa.SavedForward
Workspace = _uaa.Workspace
set_num_threads = _uaa.set_num_threads
num_threads = _uaa.num_threads
kernel_name = _uaa.kernel_name
backward_kernel_name = _uaa.backward_kernel_name
mpi_library_version = _uaa.mpi_library_version


_MPI_ADVICE = (
    ": both sides of a communicator must use the same MPI library (one process cannot mix two). "
    "Build uaa against mpi4py's MPI (Debian's python3-mpi4py uses Open MPI, the system default), "
    "or install an mpi4py built for uaa's MPI."
)


def mpi_mismatch(library_version, mpi4py_version, library_vendor=None, mpi4py_vendor=None):
    """Why uaa's MPI and mpi4py's differ, or None. Compares the vendors and versions the two were
    compiled against (``(name, (major, minor, micro))``, as mpi4py.MPI.get_vendor() gives them),
    then the MPI_Get_library_version() strings of the libraries they run with."""
    if library_vendor is not None and mpi4py_vendor is not None:
        a, b = tuple(library_vendor), tuple(mpi4py_vendor)
        if (a[0], tuple(a[1])) != (b[0], tuple(b[1])):
            return "uaa was built against %s %s but mpi4py against %s %s" % (
                a[0], ".".join(map(str, a[1])), b[0], ".".join(map(str, b[1]))) + _MPI_ADVICE
    a = library_version.strip().rstrip("\x00").strip()
    b = mpi4py_version.strip().rstrip("\x00").strip()
    if a == b:
        return None
    first = lambda s: s.splitlines()[0] if s else "(empty)"  # noqa: E731
    return ("uaa was built with the MPI library '%s' but mpi4py uses '%s'" % (first(a), first(b))
            + _MPI_ADVICE)


_why = mpi_mismatch(_uaa.mpi_library_version(), _MPI.Get_library_version(),
                    _uaa.mpi_compiled_vendor(), _MPI.get_vendor())
if _why is not None:
    raise ImportError(_why)


# --- communicators --------------------------------------------------------------------------


class Communicator:
    """A uaa communicator over an mpi4py communicator (duplicated, as the C++ make_mpi_communicator
    does: uaa's traffic never mixes with the caller's). Collective over ``comm``.

    ``timeout``: deadline in seconds of every blocking operation (None: ``UAA_TIMEOUT_SECONDS`` or
    300 s); ``peer_reads``: single-copy peer access when all ranks share a node.
    """

    __slots__ = ("_c", "__weakref__")
    _world = None

    def __init__(self, comm=None, *, timeout=None, peer_reads=True, max_count=2147483647):
        if comm is None:
            comm = _MPI.COMM_WORLD
        if not isinstance(comm, _MPI.Comm):
            raise TypeError(
                "uaa.Communicator takes an mpi4py communicator (e.g. MPI.COMM_WORLD), not %s"
                % type(comm).__qualname__
            )
        self._c = _uaa.Communicator.from_mpi4py(comm, timeout, peer_reads, max_count)

    @classmethod
    def world(cls):
        """The communicator over MPI.COMM_WORLD, made on the first call (collective then) and
        shared afterwards."""
        if cls._world is None:
            cls._world = cls(_MPI.COMM_WORLD)
        return cls._world

    @classmethod
    def _wrap(cls, c):
        self = cls.__new__(cls)
        self._c = c
        return self

    rank = property(lambda self: self._c.rank, doc="this process's rank")
    size = property(lambda self: self._c.size, doc="number of ranks")
    transport = property(lambda self: self._c.transport, doc='"mpi"')
    can_read_peers = property(
        lambda self: self._c.can_read_peers,
        doc="whether calls move data by single-copy peer reads/writes (one node)",
    )

    def __repr__(self):
        return "uaa.Communicator(rank %d of %d, %s%s)" % (
            self.rank,
            self.size,
            self.transport,
            ", peer memory" if self.can_read_peers else "",
        )


# --- plans ----------------------------------------------------------------------------------


def _dtype_name(dtype):
    if isinstance(dtype, str):
        name = dtype.lower()
    else:
        text = str(dtype)
        if text.startswith("torch."):
            name = text[len("torch."):]
        else:
            try:
                name = _np.dtype(dtype).name
            except TypeError:
                name = text
    return {"f32": "float32", "bf16": "bfloat16"}.get(name, name)


def _integer(x, name):
    """x as a Python int that fits uaa's int64 (NumPy and other integers too; no floats)."""
    try:
        n = _operator.index(x)
    except TypeError:
        raise TypeError("%s must be an integer, not %s" % (name, type(x).__qualname__)) from None
    if not -(1 << 63) <= n < (1 << 63):
        raise OverflowError("%s %d does not fit in 64 bits" % (name, n))
    return n


def _lengths(x, name):
    if isinstance(x, (str, bytes)):
        raise TypeError("%s must be a sequence of integers, not %s" % (name, type(x).__qualname__))
    try:
        items = list(x)
    except TypeError:
        raise TypeError("%s must be a sequence of integers, not %s"
                        % (name, type(x).__qualname__)) from None
    return [_integer(n, name) for n in items]


def _is_lengths(x):
    return all(isinstance(n, (int, _np.integer)) for n in x)


def _docs_arg(docs, what):
    """docs: None, [n0, n1, ...] (self attention) or (q_docs, kv_docs) -> (q, kv) or None."""
    if docs is None:
        return None
    if not isinstance(docs, (str, bytes)):
        docs = list(docs)
        if _is_lengths(docs):
            return (_lengths(docs, what), [])
        if len(docs) == 2 and not isinstance(docs[0], (str, bytes)) and \
                not isinstance(docs[1], (str, bytes)):
            return (_lengths(docs[0], what), _lengths(docs[1], what))
    raise TypeError(
        "%s: a list of lengths (self attention) or a pair (query lengths, key/value lengths), "
        "not %r" % (what, docs)
    )


def _window_arg(window):
    if window is None:
        return (-1, -1)
    if isinstance(window, (int, _np.integer)):
        n = _integer(window, "window")
        return (n, n)
    try:
        left, right = window
    except (TypeError, ValueError):
        raise TypeError("window must be None, an int or a (left, right) pair, not %r"
                        % (window,)) from None
    return (-1 if left is None else _integer(left, "window"),
            -1 if right is None else _integer(right, "window"))


def _plan_spec(heads, kv_heads, head_dim, dtype, causal, scale, return_lse, batch, window,
               docs, cu_seqlens, strategy, allow_mixed_kernels, backward_order):
    """The keywords as the binding's PlanSpec (what the binding cannot parse it keeps as the
    spec's problem; what Python cannot convert raises here)."""
    left, right = _window_arg(window)
    return _uaa.PlanSpec(
        heads=_integer(heads, "heads"),
        kv_heads=0 if kv_heads is None else _integer(kv_heads, "kv_heads"),
        head_dim=_integer(head_dim, "head_dim"),
        dtype=_dtype_name(dtype),
        causal=bool(causal),
        scale=0.0 if scale is None else float(scale),
        return_lse=bool(return_lse),
        batch=_integer(batch, "batch"),
        window_left=left,
        window_right=right,
        docs=_docs_arg(docs, "docs"),
        cu_seqlens=_docs_arg(cu_seqlens, "cu_seqlens"),
        strategy=str(strategy),
        allow_mixed_kernels=bool(allow_mixed_kernels),
        backward_order=str(backward_order),
    )


class Plan:
    """An immutable description of one sequence-parallel attention layout (uaa::Plan): every rank's
    token counts, the shape, the split of the work. Build once per layout, use for every layer and
    step. Collective over ``comm`` (one small all-gather).

    ``q_tokens`` / ``kv_tokens`` are this rank's (kv_tokens defaults to q_tokens). Keywords:
    ``heads``, ``kv_heads`` (GQA; default heads), ``head_dim``, ``causal``, ``window=(L, R)``
    (sliding window, None/-1 = unbounded), ``docs=[n0, n1, ...]`` or ``docs=(q_docs, kv_docs)``
    (packed documents, global lengths; or ``cu_seqlens=`` cumulative offsets), ``batch=B``
    (``[B, S, H, D]`` tensors), ``dtype`` ("float32" or "bfloat16", NumPy/PyTorch dtypes too),
    ``scale`` (default 1/sqrt(head_dim)), ``return_lse``, ``strategy``, ``allow_mixed_kernels``,
    ``backward_order``. ``comm`` may be None: :meth:`Communicator.world`.
    """

    __slots__ = ("_p", "_comm", "_twin", "_scratch_lse", "_saved_pool")

    def __init__(self, comm, q_tokens, kv_tokens=None, *, heads, head_dim, kv_heads=None,
                 causal=False, window=None, docs=None, cu_seqlens=None, batch=1, dtype="float32",
                 scale=None, return_lse=False, strategy="uaa", allow_mixed_kernels=False,
                 backward_order="canonical"):
        comm = _communicator(comm)
        try:
            spec = _plan_spec(heads, kv_heads, head_dim, dtype, causal, scale, return_lse, batch,
                              window, docs, cu_seqlens, strategy, allow_mixed_kernels,
                              backward_order)
            q_tokens = _integer(q_tokens, "q_tokens")
            kv_tokens = q_tokens if kv_tokens is None else _integer(kv_tokens, "kv_tokens")
        except (TypeError, ValueError, OverflowError) as e:
            # Collective even so: every rank raises InvalidArgumentError naming this rank.
            spec, q_tokens, kv_tokens = _uaa.PlanSpec.failed(str(e)), 0, 0
        self._init(_uaa.Plan.create(comm._c, q_tokens, kv_tokens, spec), comm)

    @classmethod
    def from_lengths(cls, comm, q_lens, kv_lens=None, *, heads, head_dim, kv_heads=None,
                     causal=False, window=None, docs=None, cu_seqlens=None, batch=1,
                     dtype="float32", scale=None, return_lse=False, strategy="uaa",
                     allow_mixed_kernels=False, backward_order="canonical"):
        """A plan from every rank's lengths (one entry per rank, the same on every rank): no
        communication. A disagreement between ranks is reported by the first call; an argument
        this rank cannot use raises here, on this rank only (as in C++: nothing is collective
        here), so pass the same arguments on every rank or use :class:`Plan`."""
        comm = _communicator(comm)
        spec = _plan_spec(heads, kv_heads, head_dim, dtype, causal, scale, return_lse, batch,
                          window, docs, cu_seqlens, strategy, allow_mixed_kernels, backward_order)
        q_lens = _lengths(q_lens, "q_lens")
        kv_lens = list(q_lens) if kv_lens is None else _lengths(kv_lens, "kv_lens")
        self = cls.__new__(cls)
        self._init(_uaa.Plan.from_lengths(comm._c, q_lens, kv_lens, spec), comm)
        return self

    def _init(self, p, comm):
        self._p = p
        self._comm = comm
        self._twin = None
        self._scratch_lse = None
        self._saved_pool = []

    # Read-only properties mirroring the C++ plan.
    communicator = property(lambda self: self._comm, doc="the uaa.Communicator it was built with")
    ranks = property(lambda self: self._p.ranks, doc="number of ranks")
    rank = property(lambda self: self._p.rank, doc="this rank")
    q_lens = property(lambda self: tuple(self._p.q_lens), doc="query tokens of every rank")
    kv_lens = property(lambda self: tuple(self._p.kv_lens), doc="key/value tokens of every rank")
    q_tokens = property(lambda self: self._p.q_tokens, doc="this rank's query tokens")
    kv_tokens = property(lambda self: self._p.kv_tokens, doc="this rank's key/value tokens")
    q_total = property(lambda self: self._p.q_total, doc="query tokens of one sequence")
    kv_total = property(lambda self: self._p.kv_total, doc="key/value tokens of one sequence")
    batch = property(lambda self: self._p.batch, doc="sequences per call")
    heads = property(lambda self: self._p.heads, doc="query heads")
    kv_heads = property(lambda self: self._p.kv_heads, doc="key/value heads")
    head_dim = property(lambda self: self._p.head_dim, doc="head dimension")
    dtype = property(lambda self: self._p.dtype, doc='"float32" or "bfloat16"')
    causal = property(lambda self: self._p.causal, doc="causal mask (bottom-right aligned)")
    scale = property(lambda self: self._p.scale, doc="softmax scale")
    return_lse = property(lambda self: self._p.return_lse, doc="whether calls produce the lse")
    window = property(lambda self: self._p.window, doc="(left, right) sliding window, -1: none")
    strategy = property(lambda self: self._p.strategy, doc="work distribution strategy")
    allow_mixed_kernels = property(lambda self: self._p.allow_mixed_kernels)
    backward_order = property(lambda self: self._p.backward_order)
    bytes_sent = property(lambda self: self._p.bytes_sent, doc="bytes one forward sends")
    bytes_received = property(lambda self: self._p.bytes_received, doc="bytes one forward receives")
    saved_bytes = property(lambda self: self._p.saved_bytes, doc="bytes a SavedForward holds")
    staging_bytes = property(lambda self: self._p.staging_bytes, doc="staging a forward needs")
    fingerprint = property(lambda self: self._p.fingerprint, doc="digest of the layout")

    @property
    def documents(self):
        """(query document lengths, key/value document lengths) of one sequence."""
        q, kv = self._p.documents
        return (tuple(q), tuple(kv))

    def work(self, rank):
        """(first_head, first_row, end_head, end_row): the attention work of ``rank``."""
        return self._p.work(rank)

    def q_head_range(self, rank):
        return self._p.q_head_range(rank)

    def kv_head_range(self, rank):
        return self._p.kv_head_range(rank)

    def backward_bytes_sent(self, saved=True):
        return self._p.backward_bytes_sent(saved)

    def backward_bytes_received(self, saved=True):
        return self._p.backward_bytes_received(saved)

    def describe(self):
        return self._p.describe()

    def __repr__(self):
        return self._p.describe()

    # The same layout with return_lse (what a call needs to produce the lse, and what the backward
    # needs): Plan::from_lengths in the binding, so it costs no communication. Made once per plan.
    def _lse_plan(self):
        if self._p.return_lse:
            return self
        if self._twin is None:
            self._twin = Plan.__new__(Plan)
            self._twin._init(self._p.lse_twin(), self._comm)
        return self._twin

    def _lse_shape(self, batched):
        head = (self._p.batch,) if batched else ()
        return head + (self._p.q_tokens, self._p.heads)

    def _take_saved(self):
        return self._saved_pool.pop() if self._saved_pool else SavedForward()

    def _give_saved(self, saved):
        if len(self._saved_pool) < 64:
            self._saved_pool.append(saved)


def _communicator(comm):
    if comm is None:
        return Communicator.world()
    if isinstance(comm, Communicator):
        return comm
    if isinstance(comm, _MPI.Comm):
        raise TypeError(
            "pass a uaa.Communicator (uaa.Communicator(mpi4py_comm) once, then reuse it), not an "
            "mpi4py communicator"
        )
    raise TypeError("comm must be a uaa.Communicator, not %s" % type(comm).__qualname__)


# --- calls ----------------------------------------------------------------------------------


def _torch_tensor_type():
    torch = _sys.modules.get("torch")
    return getattr(torch, "Tensor", None) if torch is not None else None


def _empty_like(x):
    """An uninitialized contiguous array of x's shape, in x's framework (None if x is neither)."""
    if isinstance(x, _np.ndarray):
        return _np.empty(x.shape, _np.float32)
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(x, tensor):
        torch = _sys.modules["torch"]
        dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
        return torch.empty(x.shape, dtype=dtype)
    return None


def _empty_lse(q, plan):
    batched = getattr(q, "ndim", 3) == 4
    shape = plan._lse_shape(batched)
    tensor = _torch_tensor_type()
    if tensor is not None and isinstance(q, tensor):
        return _sys.modules["torch"].empty(shape, dtype=_sys.modules["torch"].float32)
    return _np.empty(shape, _np.float32)


def attention(q, k, v, plan, *, out=None, lse=None, return_lse=False, workspace=None):
    """Sequence-parallel attention (collective over the plan's communicator).

    q: [S, Hq, D] or [B, S, Hq, D] (S = plan.q_tokens), k, v: [Skv, Hkv, D] (or batched), NumPy
    float32 or PyTorch CPU float32/bfloat16, last axis contiguous. Returns ``out`` (allocated like
    q unless given) or ``(out, lse)`` with ``return_lse`` (lse: float32 [S, Hq] or [B, S, Hq],
    the natural-log log-sum-exp of the scaled scores; pass ``lse=`` to write into your own). The
    result is bitwise that of one rank running the whole sequence. No autograd: see
    :func:`uaa.torch.attention`.
    """
    p = plan
    if return_lse or lse is not None:
        p = plan._lse_plan()
        if lse is None:
            lse = _empty_lse(q, p)
    elif plan._p.return_lse:
        # The plan produces an lse the caller did not ask for: a scratch array, kept per plan.
        shape = plan._lse_shape(getattr(q, "ndim", 3) == 4)
        if plan._scratch_lse is None or plan._scratch_lse.shape != shape:
            plan._scratch_lse = _np.empty(shape, _np.float32)
        lse = plan._scratch_lse
    if out is None:
        out = _empty_like(q)
    _uaa.forward(p._p, q, k, v, out, lse, None, workspace)
    return (out, lse) if return_lse else out


def forward(plan, q, k, v, out, *, lse=None, saved=None, workspace=None, times=False):
    """uaa::forward with the caller's arrays (lse required iff plan.return_lse; ``saved`` a
    :class:`SavedForward` to fill for :func:`backward`). Returns the phase times in ms (a dict)
    with ``times=True``, else None. Collective."""
    return _uaa.forward(plan._p, q, k, v, out, lse, saved, workspace, times)


def backward(plan, q, k, v, out, lse, dout, dq, dk, dv, *, saved=None, workspace=None,
             times=False):
    """uaa::backward: dq, dk, dv (written) from the forward's q, k, v, out, lse and dout. Saved
    mode with the forward's ``saved``, else recompute mode. The plan needs return_lse. Collective."""
    return _uaa.backward(plan._p, q, k, v, out, lse, dout, dq, dk, dv, saved, workspace, times)
