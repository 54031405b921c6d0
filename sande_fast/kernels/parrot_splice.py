"""Parrot splice: write a soft prompt ("parrot", [n, H]) into fixed rows of a batch of embeddings.

Given the flat embeddings ``x`` ([T, H]) and splice starts ``starts`` ([S]), the output is
``x`` with rows ``starts[s] + j`` (``0 <= j < n``) replaced by ``parrot[j]``. One output tensor is
written by one pass (no per-sample ``torch.cat``). Backward::

    grad_x = grad_out with the parrot rows zeroed
    grad_parrot[j] = sum_s grad_out[starts[s] + j]      (accumulated in fp32)

The Triton path first builds a row map ``pmap`` ([T] int32: parrot row index or -1), which both
the forward and the grad_x kernels read, so that neither needs to search ``starts`` per row.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .backend import resolve_backend

__all__ = ["parrot_splice", "parrot_splice_reference", "check_splice"]

triton: Any = None
tl: Any = None
_tile_rows: Any = None  # a @triton.jit helper of the kernels below, a global for the same reason
_TRITON_KERNELS: dict[str, Any] | None = None


def _build_triton_kernels() -> dict[str, Any]:
    """Import triton and JIT-decorate the splice kernels (cached).

    Returns:
        ``{"map": ..., "fwd": ..., "grad_x": ..., "grad_p": ...}`` ``@triton.jit`` kernels.
    """
    global triton, tl, _tile_rows, _TRITON_KERNELS
    if _TRITON_KERNELS is not None:
        return _TRITON_KERNELS
    import triton as _triton
    import triton.language as _tl

    triton, tl = _triton, _tl  # module globals, which the kernel bodies resolve names from

    @triton.jit
    def _map_kernel(starts_ptr, pmap_ptr, n, BLOCK_N: tl.constexpr):
        # One program per splice: pmap[starts[s] + j] = j.
        s = tl.program_id(0)
        st = tl.load(starts_ptr + s)
        for j0 in range(0, n, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            tl.store(pmap_ptr + st + j, j.to(tl.int32), mask=j < n)

    @triton.jit
    def _tile_rows(pmap_ptr, T, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        # This program's [BLOCK_R, BLOCK_H] tile: its columns, the parrot row of each of its
        # rows (-1: an ordinary row), which rows are parrot rows, the mask and the offsets.
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        rmask = rows < T
        j = tl.load(pmap_ptr + rows, mask=rmask, other=-1)
        m2 = rmask[:, None] & (cols < H)[None, :]
        offs = rows.to(tl.int64)[:, None] * H + cols[None, :]
        return cols, j, (j >= 0)[:, None], m2, offs

    @triton.jit
    def _fwd_kernel(x_ptr, p_ptr, pmap_ptr, out_ptr, T, H,
                    BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        cols, j, is_p, m2, offs = _tile_rows(pmap_ptr, T, H, BLOCK_R, BLOCK_H)
        # Each element is read from exactly one source: x for ordinary rows, parrot otherwise.
        xv = tl.load(x_ptr + offs, mask=m2 & ~is_p, other=0.0)
        pv = tl.load(p_ptr + j.to(tl.int64)[:, None] * H + cols[None, :], mask=m2 & is_p, other=0.0)
        out = tl.where(is_p, pv.to(out_ptr.dtype.element_ty), xv.to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + offs, out, mask=m2)

    @triton.jit
    def _grad_x_kernel(g_ptr, pmap_ptr, gx_ptr, T, H,
                       BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
        cols, j, is_p, m2, offs = _tile_rows(pmap_ptr, T, H, BLOCK_R, BLOCK_H)
        gv = tl.load(g_ptr + offs, mask=m2 & ~is_p, other=0.0)  # parrot rows read as 0
        tl.store(gx_ptr + offs, gv.to(gx_ptr.dtype.element_ty), mask=m2)

    @triton.jit
    def _grad_p_kernel(g_ptr, starts_ptr, gp_ptr, S, H, BLOCK_H: tl.constexpr):
        # One program per (parrot row j, column block): a deterministic fp32 sum over splices.
        j = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        cmask = cols < H
        acc = tl.zeros([BLOCK_H], tl.float32)
        for s in range(0, S):
            row = (tl.load(starts_ptr + s) + j).to(tl.int64)
            acc += tl.load(g_ptr + row * H + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(gp_ptr + j.to(tl.int64) * H + cols, acc.to(gp_ptr.dtype.element_ty), mask=cmask)

    _TRITON_KERNELS = {"map": _map_kernel, "fwd": _fwd_kernel, "grad_x": _grad_x_kernel,
                       "grad_p": _grad_p_kernel}
    return _TRITON_KERNELS


def _tile(t: int, h: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_H, num_warps) for the row-tiled copy kernels over a [T, H] tensor."""
    block_h = min(1024, triton.next_power_of_2(max(h, 1)))
    block_r = max(1, min(16, 4096 // block_h))
    return block_r, block_h, 4


def _splice_rows(starts: Tensor, n: int) -> Tensor:
    """[S * n] int64 flat row indices covered by the splices, splice-major."""
    return (starts.unsqueeze(1) + torch.arange(n, device=starts.device)).reshape(-1)


class _ParrotSplice(torch.autograd.Function):
    """Autograd wrapper around the forward splice and its two backward reductions."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, parrot: Tensor, starts: Tensor, backend: str) -> Tensor:  # type: ignore[override]
        t, h = x.shape
        n = parrot.shape[0]
        ctx.backend, ctx.n, ctx.parrot_dtype = backend, n, parrot.dtype
        if backend == "triton":
            k = _build_triton_kernels()
            xc, pc = x.contiguous(), parrot.contiguous()
            pmap = torch.full((t,), -1, dtype=torch.int32, device=x.device)
            if starts.numel() > 0 and n > 0:
                k["map"][(starts.numel(),)](starts, pmap, n, BLOCK_N=min(1024, triton.next_power_of_2(n)))
            out = torch.empty_like(xc)
            if t > 0 and h > 0:
                br, bh, nw = _tile(t, h)
                k["fwd"][(triton.cdiv(t, br), triton.cdiv(h, bh))](
                    xc, pc, pmap, out, t, h, BLOCK_R=br, BLOCK_H=bh, num_warps=nw)
            ctx.save_for_backward(starts, pmap)
            return out
        rows = _splice_rows(starts, n)
        out = x.clone(memory_format=torch.contiguous_format)  # so the caller's .view(shape) works
        out[rows] = parrot.to(x.dtype).repeat(starts.numel(), 1)  # index_put
        ctx.save_for_backward(starts, rows)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        need_x, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        starts, aux = ctx.saved_tensors
        n = ctx.n
        g = grad_out.contiguous()
        t, h = g.shape
        s_count = starts.numel()
        grad_x = grad_p = None
        if ctx.backend == "triton":
            k = _build_triton_kernels()
            if need_x:
                grad_x = torch.empty_like(g)
                if t > 0 and h > 0:
                    br, bh, nw = _tile(t, h)
                    k["grad_x"][(triton.cdiv(t, br), triton.cdiv(h, bh))](
                        g, aux, grad_x, t, h, BLOCK_R=br, BLOCK_H=bh, num_warps=nw)
            if need_p:
                grad_p = torch.empty((n, h), dtype=ctx.parrot_dtype, device=g.device)
                if n > 0 and h > 0:
                    bh = min(1024, triton.next_power_of_2(h))
                    k["grad_p"][(n, triton.cdiv(h, bh))](g, starts, grad_p, s_count, h, BLOCK_H=bh)
        else:
            rows = aux
            if need_x:
                grad_x = g.clone()
                grad_x.index_fill_(0, rows, 0)
            if need_p:
                acc = torch.zeros((n, h), dtype=torch.float32, device=g.device)
                acc.index_add_(0, torch.arange(n, device=g.device).repeat(s_count),
                               g.index_select(0, rows).float())
                grad_p = acc.to(ctx.parrot_dtype)
        return grad_x, grad_p, None, None


def check_splice(x2: Tensor, parrot: Tensor, starts: Tensor) -> Tensor:
    """Validate shapes and (with one host sync) the splice ranges; returns int64 ``starts``.

    Raises:
        ValueError: shape mismatch, a splice outside [0, T), or overlapping splices.
    """
    if parrot.dim() != 2 or parrot.shape[1] != x2.shape[1]:
        raise ValueError(f"parrot must be [n, H={x2.shape[1]}], got {tuple(parrot.shape)}")
    if starts.dim() != 1 or starts.dtype.is_floating_point or starts.dtype == torch.bool:
        raise ValueError(f"starts must be a 1-D integer tensor, got {starts.dtype} {tuple(starts.shape)}")
    if starts.device != x2.device or parrot.device != x2.device:
        raise ValueError("token_embeds, parrot and starts must be on the same device")
    starts = starts.long().contiguous()
    n, t, s_count = parrot.shape[0], x2.shape[0], starts.numel()
    if s_count == 0 or n == 0:
        return starts
    srt = torch.sort(starts).values
    gap = (srt[1:] - srt[:-1]).min() if s_count > 1 else srt.new_tensor(n)
    lo, hi, min_gap = torch.stack([srt[0], srt[-1], gap]).tolist()  # the one host sync
    if lo < 0 or hi + n > t:
        raise ValueError(f"splices must lie in [0, {t}): starts span [{lo}, {hi}] with n={n}")
    if min_gap < n:
        raise ValueError(f"splices overlap: two starts are {min_gap} apart but n={n}")
    return starts


def parrot_splice(token_embeds: Tensor, parrot: Tensor, starts: Tensor, *, backend: str = "auto") -> Tensor:
    """Replace rows ``starts[s] .. starts[s]+n-1`` of the flat embeddings by the parrot.

    Args:
        token_embeds: [T, H] or [B, L, H] (treated as its flat [B*L, H] view) input embeddings,
            any float dtype; the rows under the splices are placeholders and are overwritten.
        parrot: [n, H] soft prompt, any float dtype (cast to ``token_embeds.dtype`` in the output).
        starts: [S] int64 flat row index of each splice's first row; splices must not overlap.
        backend: ``"auto"`` | ``"triton"`` | ``"torch"``; auto = triton on CUDA when available.

    Returns:
        Tensor of ``token_embeds``' shape and dtype. Grads: ``token_embeds`` gets grad_out with the
        parrot rows zeroed; ``parrot`` gets the fp32 sum over splices, in parrot's dtype.

    Raises:
        ValueError: bad shapes, splices out of range or overlapping.
    """
    if token_embeds.dim() not in (2, 3):
        raise ValueError(f"token_embeds must be [T, H] or [B, L, H], got {tuple(token_embeds.shape)}")
    shape = token_embeds.shape
    x2 = token_embeds.reshape(-1, shape[-1])
    starts = check_splice(x2, parrot, starts)
    resolved = resolve_backend(backend, x2.device)
    out = _ParrotSplice.apply(x2, parrot, starts, resolved)
    return out.view(shape)


def parrot_splice_reference(token_embeds: Tensor, parrot: Tensor, starts: Tensor, *, backend: str = "auto") -> Tensor:
    """Obviously-correct oracle for :func:`parrot_splice`: slices and one ``torch.cat``.

    Args/Returns: as :func:`parrot_splice` (``backend`` is ignored). Differentiable by autograd.
    """
    del backend
    shape = token_embeds.shape
    x2 = token_embeds.reshape(-1, shape[-1])
    p = parrot.to(x2.dtype)
    n = parrot.shape[0]
    pieces: list[Tensor] = []
    prev = 0
    for st in sorted(int(s) for s in starts.tolist()):
        pieces.append(x2[prev:st])
        pieces.append(p)
        prev = st + n
    pieces.append(x2[prev:])
    return torch.cat(pieces, dim=0).view(shape)
