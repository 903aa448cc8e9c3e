"""uaa for PyTorch autograd: :func:`attention` is a drop-in for the attention call of a
sequence-parallel model, and ``loss.backward()`` runs uaa's backward pass.

::

    import uaa, uaa.torch
    plan = uaa.Plan(uaa.Communicator.world(), my_tokens, heads=8, head_dim=64, causal=True)
    out = uaa.torch.attention(q, k, v, plan)    # q: [S, H, D] or [B, S, H, D], requires_grad
    loss = (out * out).sum()
    loss.backward()                             # q.grad, k.grad, v.grad (collective)

The forward and the backward are collective over the plan's communicator: every rank must call
them in the same order (autograd runs the backward nodes of the same graph in the same order on
every rank; a rank must not leave its output out of its loss, or its backward never runs: use
``0 * out.sum()`` for a rank that holds no tokens' loss). Gradients are bitwise those of one rank
running the whole sequence.
"""

import torch as _torch

import uaa as _uaa_pkg
from uaa import _uaa

__all__ = ["attention", "Attention"]

_MODES = ("saved", "recompute")


def _usable(t):
    """Whether uaa can read t as it is (last axis contiguous, no broadcast batch)."""
    if t.dim() == 0:
        return False
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    if t.dim() == 4 and t.shape[0] > 1 and t.stride(0) == 0:
        return False
    return True


class _Attention(_torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, mode, workspace):
        p = plan._lse_plan()
        out = _torch.empty(q.shape, dtype=q.dtype)
        lse = _torch.empty(p._lse_shape(q.dim() == 4), dtype=_torch.float32)
        # A SavedForward only where a backward may follow (none under no_grad or for inputs
        # that need no gradient); the plan (with lse) is the same either way, on every rank.
        saved = p._take_saved() if mode == "saved" and any(ctx.needs_input_grad[:3]) else None
        try:
            _uaa.forward(p._p, q, k, v, out, lse, saved, workspace)
        except BaseException:
            if saved is not None:
                p._give_saved(saved)
            raise
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.uaa = (p, saved, workspace)
        return out

    @staticmethod
    @_torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        p, saved, workspace = ctx.uaa
        if dout.dtype != out.dtype:
            dout = dout.to(out.dtype)
        if not _usable(dout):
            dout = dout.contiguous()
        dq = _torch.empty(q.shape, dtype=q.dtype)
        dk = _torch.empty(k.shape, dtype=k.dtype)
        dv = _torch.empty(v.shape, dtype=v.dtype)
        try:
            _uaa.backward(p._p, q, k, v, out, lse, dout, dq, dk, dv, saved, workspace)
        finally:
            if saved is not None:
                p._give_saved(saved)
            ctx.uaa = None
        return dq, dk, dv, None, None, None


def attention(q, k, v, plan, *, mode="saved", workspace=None):
    """Sequence-parallel attention with autograd (collective, forward and backward).

    q: [S, Hq, D] or [B, S, Hq, D] (S = plan.q_tokens), k, v: [Skv, Hkv, D] (or batched),
    PyTorch CPU tensors, torch.float32 or torch.bfloat16, last axis contiguous. Returns out, shaped
    like q. ``mode="saved"`` (default): the forward keeps the q/k/v rows it received
    (``plan.saved_bytes``) and the backward moves only dO in and dQ/dK/dV out; ``"recompute"``:
    nothing is kept, the backward moves q/k/v again. The plan need not have return_lse.
    SavedForwards are reused: after its backward, one goes back to a pool of the plan (so a model
    whose L layers share a plan keeps L of them between steps, as during a step).
    """
    if mode not in _MODES:
        raise ValueError("mode must be 'saved' or 'recompute', not %r" % (mode,))
    if not isinstance(plan, _uaa_pkg.Plan):
        raise TypeError("plan must be a uaa.Plan, not %s" % type(plan).__qualname__)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, _torch.Tensor):
            # Collective, like every other bad argument: every rank raises this.
            _uaa.fail_forward(plan._lse_plan()._p, "uaa.torch.attention takes torch tensors; %s is a %s"
                              % (name, type(t).__qualname__))
    return _Attention.apply(q, k, v, plan, mode, workspace)


class Attention(_torch.nn.Module):
    """``attention(q, k, v, plan)`` as a module (no parameters): ``Attention(plan)(q, k, v)``."""

    def __init__(self, plan, mode="saved"):
        super().__init__()
        if mode not in _MODES:
            raise ValueError("mode must be 'saved' or 'recompute', not %r" % (mode,))
        self.plan = plan
        self.mode = mode

    def forward(self, q, k, v):
        return attention(q, k, v, self.plan, mode=self.mode)

    def extra_repr(self):
        return "mode=%s, %s" % (self.mode, self.plan.describe())
