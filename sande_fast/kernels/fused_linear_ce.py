"""Supervised-row fused linear cross-entropy: LM-head projection + CE without the [R, V] logits.

The forward pass walks the kept (non-ignored) rows in chunks of ``C`` rows. For each chunk it
projects to logits ``[C, V]``, computes the loss and, in place, the gradient of the loss w.r.t.
those logits, then immediately folds that gradient into the grads of ``hidden`` (and of ``weight``
/ ``bias`` when they require grad). Only one chunk of logits ever exists, and the backward pass is a
scalar multiply of the stored grads.

Maths, with ``z = s * (h @ W.T + b)`` (``s = logit_scale``) and ``D`` the loss denominator::

    loss  = sum_rows (logsumexp(z_r) - z_r[y_r]) / D
    dL/d(h @ W.T + b) = s * (softmax(z) - onehot(y)) / D         # "grad_logits", [C, V]
    dL/dh = grad_logits @ W      dL/dW = grad_logits.T @ h      dL/db = grad_logits.sum(0)
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_backend

__all__ = ["fused_linear_cross_entropy", "fused_linear_cross_entropy_reference"]

# Elements of one chunk's [C, V] logits. On GPU a larger chunk keeps the grad_W GEMM (K = C)
# compute-bound, because each chunk re-reads and re-writes the [V, H] accumulator; on CPU the
# matmuls are efficient at any size, so memory is the only concern.
_CHUNK_ELEMS_CUDA = 1 << 26
_CHUNK_ELEMS_CPU = 1 << 23


# --------------------------------------------------------------------------------------------
# Triton kernel (built lazily so that importing this module never imports triton, and so that
# TRITON_INTERPRET is read when the kernel is first needed).
# --------------------------------------------------------------------------------------------
triton: Any = None
tl: Any = None


def _build_triton_kernel() -> Any:
    """Import triton and JIT-decorate the CE kernel; cached in ``_TRITON_KERNEL``.

    Returns:
        The ``@triton.jit`` kernel ``_ce_grad_kernel``.
    """
    global triton, tl, _TRITON_KERNEL
    if _TRITON_KERNEL is not None:
        return _TRITON_KERNEL
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl  # module globals, which the kernel body resolves names from

    @triton.jit
    def _ce_grad_kernel(
        logits_ptr,  # [C, V] any float dtype, overwritten with the scaled grad
        stride_row,  # row stride of logits, in elements
        labels_ptr,  # [C] int64, all in [0, V)
        loss_ptr,  # [C] fp32 out: per-row loss (unnormalised)
        V,
        logit_scale,  # fp32: z = logit_scale * logits
        grad_scale,  # fp32: logit_scale / denominator
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        label = tl.load(labels_ptr + row)
        # Online logsumexp kept per lane (one running max/sum per column slot): no cross-lane
        # reduction inside the loop, a single one at the end. The initial max is a finite
        # sentinel, not -inf, so that lanes that only ever see padding give exp(0)*0, not NaN.
        m = tl.full([BLOCK_V], -1.0e30, tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, z)
            s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
            m = m_new
        m_row = tl.max(m, axis=0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
        z_label = tl.load(base + label).to(tl.float32) * logit_scale
        tl.store(loss_ptr + row, lse - z_label)
        # Second pass: overwrite the logits with (softmax - onehot) * grad_scale.
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) * logit_scale
            g = tl.exp(z - lse)
            g = tl.where(cols == label, g - 1.0, g) * grad_scale
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)

    _TRITON_KERNEL = _ce_grad_kernel
    return _TRITON_KERNEL


_TRITON_KERNEL: Any = None


def _ce_grad_triton(logits: Tensor, labels: Tensor, logit_scale: float, grad_scale: float) -> Tensor:
    """Triton chunk step: per-row CE loss, logits overwritten in place by the scaled grad.

    Args:
        logits: [C, V] fp32/bf16/fp16, unscaled ``h @ W.T + b``; row-contiguous.
        labels: [C] int64 in [0, V).
        logit_scale: multiplier applied to the logits before the softmax.
        grad_scale: ``logit_scale / denominator``.

    Returns:
        [C] fp32 per-row loss. ``logits`` now holds ``(softmax - onehot) * grad_scale``.
    """
    kernel = _build_triton_kernel()
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c == 0:
        return loss
    block_v = min(4096, triton.next_power_of_2(v))
    kernel[(c,)](
        logits, logits.stride(0), labels, loss, v, float(logit_scale), float(grad_scale),
        BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )
    return loss


def _ce_grad_torch(logits: Tensor, labels: Tensor, logit_scale: float, grad_scale: float) -> tuple[Tensor, Tensor]:
    """Plain-torch chunk step, same contract as :func:`_ce_grad_triton` but returns the grad.

    Args:
        logits: [C, V] unscaled logits (fp32 is updated in place; half dtypes are upcast).
        labels: [C] int64 in [0, V).
        logit_scale: multiplier applied to the logits before the softmax.
        grad_scale: ``logit_scale / denominator``.

    Returns:
        ([C] fp32 per-row loss, [C, V] grad in ``logits.dtype``).
    """
    z = logits.float()  # no copy for fp32: the grad overwrites the logits, like the kernel
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    lse = torch.logsumexp(z, dim=1)
    loss = lse - z.gather(1, labels.unsqueeze(1)).squeeze(1)
    z.sub_(lse.unsqueeze(1)).exp_()
    z.scatter_add_(1, labels.unsqueeze(1), z.new_full((z.shape[0], 1), -1.0))
    z.mul_(grad_scale)
    return loss, z.to(logits.dtype)


_ADDMM_F32_OK: dict[torch.device, bool] = {}


def _addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` fp32 and ``a``/``b`` possibly half precision.

    Accumulating grad_W across chunks in fp32 keeps one rounding at the end instead of one per
    chunk. On CUDA, ``addmm(..., out_dtype=float32)`` writes straight into the fp32 accumulator
    (no [V, H] temporary); elsewhere (or on torch without it) a half-precision product is added.

    Args:
        acc: [M, N] fp32, updated in place.
        a: [M, K] and b: [K, N], same dtype as each other.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    dev = acc.device
    if dev.type == "cuda" and _ADDMM_F32_OK.get(dev, True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_F32_OK[dev] = True
            return
        except (RuntimeError, TypeError):
            _ADDMM_F32_OK[dev] = False
    acc.add_(torch.mm(a, b))


def _default_chunk_rows(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk so that a chunk's [C, V] logits stay under the per-device element budget."""
    budget = _CHUNK_ELEMS_CUDA if device.type == "cuda" else _CHUNK_ELEMS_CPU
    c = max(1, budget // max(vocab, 1))
    if c >= 64:
        c -= c % 64  # tensor-core friendly M
    return max(1, min(c, n_rows))


class _FusedLinearCE(torch.autograd.Function):
    """Autograd wrapper: the forward computes loss and all needed grads; backward scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        ignore_index: int,
        reduction: str,
        normalizer: float | None,
        logit_scale: float,
        chunk_rows: int | None,
        backend: str,
    ) -> Tensor:
        r, h_dim = hidden.shape
        v = weight.shape[0]
        dev = hidden.device
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        cdtype = weight.dtype  # matmuls run in the weight's dtype (fp32 accumulation inside)

        # Drop ignored rows before any projection. nonzero() syncs once; the range check below
        # costs a second small sync, which buys a clear error instead of a device-side assert.
        keep = (labels != ignore_index).nonzero().squeeze(1)
        n = keep.numel()
        all_kept = n == r
        kept_labels = labels if all_kept else labels.index_select(0, keep)
        if n > 0:
            lo, hi = torch.aminmax(kept_labels)
            lo_i, hi_i = int(lo), int(hi)
            if lo_i < 0 or hi_i >= v:
                raise ValueError(
                    f"labels must be in [0, {v}) or equal ignore_index={ignore_index}; "
                    f"got values in [{lo_i}, {hi_i}]"
                )

        if normalizer is not None:
            denom = float(normalizer)
        elif reduction == "mean":
            denom = float(max(n, 1))  # all rows ignored -> loss 0, not NaN
        else:
            denom = 1.0
        grad_scale = logit_scale / denom

        loss = torch.zeros((), dtype=torch.float32, device=dev)
        grad_h = torch.zeros_like(hidden) if (need_h and not all_kept) else None
        grad_h_kept = torch.empty((n, h_dim), dtype=cdtype, device=dev) if need_h else None
        # grad_W accumulates over chunks: fp32 unless a single chunk does it in one GEMM.
        c = chunk_rows if chunk_rows is not None else _default_chunk_rows(n, v, dev)
        one_chunk = n <= c
        acc_dtype = cdtype if (cdtype == torch.float32 or one_chunk) else torch.float32
        # The first chunk writes grad_W whole (no zero fill of [V, H]) when it can write it in
        # the accumulator's dtype; later chunks add to it.
        first_writes = acc_dtype == cdtype
        grad_w = (torch.empty if first_writes else torch.zeros)(
            (v, h_dim), dtype=acc_dtype, device=dev) if need_w else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=dev) if need_b else None
        w = weight.detach()
        b = bias.detach().to(cdtype) if bias is not None else None

        for s in range(0, n, c):
            e = min(s + c, n)
            h_c = hidden[s:e] if all_kept else hidden.index_select(0, keep[s:e])
            h_c = h_c.detach().to(cdtype)
            y_c = kept_labels[s:e]
            logits = torch.addmm(b, h_c, w.t()) if b is not None else torch.mm(h_c, w.t())
            if backend == "triton":
                loss_rows = _ce_grad_triton(logits, y_c, logit_scale, grad_scale)
                g = logits
            else:
                loss_rows, g = _ce_grad_torch(logits, y_c, logit_scale, grad_scale)
            loss += loss_rows.sum()
            if grad_h_kept is not None:
                torch.mm(g, w, out=grad_h_kept[s:e])
            if grad_w is not None:
                if s == 0 and first_writes:
                    torch.mm(g.t(), h_c, out=grad_w)
                else:
                    _addmm_f32_(grad_w, g.t(), h_c)
            if grad_b is not None:
                grad_b += g.sum(0, dtype=torch.float32)
            del logits, g

        if grad_w is not None and n == 0:
            grad_w.zero_()  # no chunk ran: every row was ignored
        loss /= denom
        if need_h:
            assert grad_h_kept is not None
            if all_kept:
                grad_h = grad_h_kept.to(hidden.dtype)
            else:
                assert grad_h is not None
                grad_h.index_copy_(0, keep, grad_h_kept.to(hidden.dtype))
            del grad_h_kept
        ctx.grads = (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None and bias is not None else None,
        )
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError(
                "fused_linear_cross_entropy: backward called twice; its stored grads are scaled in "
                "place and freed, so retain_graph=True is not supported"
            )
        grads, ctx.grads = ctx.grads, None
        if grad_out.device.type == "cpu" and float(grad_out) == 1.0:
            return grads + (None,) * 7  # the usual case; reading it on the CPU costs no sync
        # In place: the stored grads are ours alone, and this avoids a second [V, H] buffer.
        out = tuple(g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in grads)
        return out + (None,) * 7


def _check_args(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
                reduction: str, normalizer: float | None, chunk_rows: int | None) -> None:
    """Cheap shape/argument validation shared by the fast path and the reference."""
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(
            f"expected hidden [R, H], weight [V, H], labels [R]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if normalizer is not None and not (math.isfinite(normalizer) and normalizer > 0):
        raise ValueError(f"normalizer must be a positive finite number, got {normalizer}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | None = None,
    logit_scale: float = 1.0,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """Cross-entropy of ``(hidden @ weight.T + bias) * logit_scale`` without materialising logits.

    Args:
        hidden: [R, H] fp32/bf16/fp16 final hidden states of the supervised rows.
        weight: [V, H] LM-head weight (may be tied; a weight grad is produced only if it
            requires grad).
        labels: [R] int64 targets; rows equal to ``ignore_index`` are dropped before projecting.
        bias: optional [V] LM-head bias.
        ignore_index: label value marking rows to skip.
        reduction: ``"mean"`` over kept rows (0 when none are kept) or ``"sum"``.
        normalizer: when given, ``loss = sum / normalizer`` (overrides ``reduction``), e.g. the
            number of supervised tokens across all gradient-accumulation micro-batches.
        logit_scale: multiplier on the logits (some architectures scale them).
        chunk_rows: kept rows per chunk; None picks it so a chunk's [C, V] logits stay small.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``; auto = triton on CUDA when available.

    Returns:
        0-dim fp32 loss. Grads flow to ``hidden``/``weight``/``bias`` in their own dtypes.

    Raises:
        ValueError: bad shapes/arguments, or a kept label outside ``[0, V)``.
    """
    _check_args(hidden, weight, labels, bias, reduction, normalizer, chunk_rows)
    resolved = resolve_backend(backend, hidden.device)
    if resolved == "triton" and not hidden.is_cuda and not (hidden.dtype == torch.float32):
        # The Triton interpreter (the only CPU route) mishandles half-precision arithmetic.
        raise RuntimeError("the Triton interpreter path only supports fp32 on CPU")
    # Contiguous labels: the Triton kernel reads label i at labels_ptr + i.
    return _FusedLinearCE.apply(
        hidden, weight, bias, labels.long().contiguous(), ignore_index, reduction, normalizer,
        float(logit_scale), chunk_rows, resolved,
    )


def fused_linear_cross_entropy_reference(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None, *,
    ignore_index: int = -100, reduction: str = "mean", normalizer: float | None = None,
    logit_scale: float = 1.0, chunk_rows: int | None = None, backend: str = "auto",
) -> Tensor:
    """Plain-torch oracle for :func:`fused_linear_cross_entropy`: full logits + ``F.cross_entropy``.

    Same arguments and result; ``chunk_rows`` and ``backend`` are accepted and ignored. Logits are
    computed in the input dtype (as a model's LM head does) and upcast to fp32 for the loss.

    Returns:
        0-dim fp32 loss, differentiable by ordinary autograd.
    """
    del chunk_rows, backend
    _check_args(hidden, weight, labels, bias, reduction, normalizer, None)
    logits = F.linear(hidden, weight, bias).float() * logit_scale  # [R, V] fp32
    total = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="sum")
    if normalizer is not None:
        return total / normalizer
    if reduction == "sum":
        return total
    n_kept = int((labels != ignore_index).sum())
    return total / max(n_kept, 1)
