"""The parrot splice: writes the parrot's rows over placeholder rows of input embeddings.

One function for every place a parrot enters a model: the fast training path, the plain
reference path and generation. The values are plain copies, so where the rows go does not
depend on which of them runs.
"""
from __future__ import annotations

import torch

from .kernels import parrot_splice
from .kernels.parrot_splice import check_splice

__all__ = ["splice_parrot"]


def splice_parrot(embeds: torch.Tensor, parrot: torch.Tensor | None,
                  starts: torch.Tensor | None, *, backend: str = "auto") -> torch.Tensor:
    """``embeds`` with rows ``starts[s] .. starts[s]+n-1`` (flat rows of ``[B*L]``) replaced by
    the parrot's ``n`` rows.

    Args:
        embeds: ``[T, H]`` or ``[B, L, H]`` input embeddings; the rows under the splices hold
            placeholders.
        parrot: ``[n, H]`` soft prompt (cast to ``embeds.dtype`` first, so its gradient is
            summed in that dtype and then cast back), or ``[S, n, H]``: one parrot per splice
            (several backdoors' parrots in one batch; plain torch indexing), or None.
        starts: ``[S]`` int64 flat row of each splice start (on ``embeds``' device), or None.
        backend: kernel backend of :func:`sande_fast.kernels.parrot_splice`.

    Returns:
        A tensor of ``embeds``' shape and dtype; ``embeds`` itself when there is no parrot or no
        splice.
    """
    if parrot is None or starts is None or not starts.numel():
        return embeds
    if parrot.dim() == 3:
        return _splice_each(embeds, parrot.to(embeds.dtype), starts)
    return parrot_splice(embeds, parrot.to(embeds.dtype), starts, backend=backend)


def _splice_each(embeds: torch.Tensor, parrots: torch.Tensor,
                 starts: torch.Tensor) -> torch.Tensor:
    """Splice ``s`` writes ``parrots[s]`` (``[S, n, H]``) at flat row ``starts[s]``."""
    if parrots.shape[0] != starts.numel():
        raise ValueError(f"{parrots.shape[0]} parrots for {starts.numel()} splices")
    shape = embeds.shape
    flat = embeds.reshape(-1, shape[-1])
    starts = check_splice(flat, parrots[0], starts)  # ranges and overlaps, as for one parrot
    n = parrots.shape[1]
    rows = (starts[:, None] + torch.arange(n, device=starts.device)).reshape(-1)
    # index_put's backward zeroes the written rows of the embeddings' gradient and gathers
    # the parrots' gradient from them, as the one-parrot kernel does.
    return flat.index_put((rows,), parrots.reshape(-1, shape[-1])).view(shape)
