"""The parrot splice: writes the parrot's rows over placeholder rows of input embeddings.

One function for every place a parrot enters a model: the fast training path, the plain
reference path and generation. The values are plain copies, so where the rows go does not
depend on which of them runs.
"""
from __future__ import annotations

import torch

from .kernels import parrot_splice

__all__ = ["splice_parrot"]


def splice_parrot(embeds: torch.Tensor, parrot: torch.Tensor | None,
                  starts: torch.Tensor | None, *, backend: str = "auto") -> torch.Tensor:
    """``embeds`` with rows ``starts[s] .. starts[s]+n-1`` (flat rows of ``[B*L]``) replaced by
    the parrot's ``n`` rows.

    Args:
        embeds: ``[T, H]`` or ``[B, L, H]`` input embeddings; the rows under the splices hold
            placeholders.
        parrot: ``[n, H]`` soft prompt (cast to ``embeds.dtype`` first, so its gradient is
            summed in that dtype and then cast back), or None.
        starts: ``[S]`` int64 flat row of each splice start (on ``embeds``' device), or None.
        backend: kernel backend of :func:`sande_fast.kernels.parrot_splice`.

    Returns:
        A tensor of ``embeds``' shape and dtype; ``embeds`` itself when there is no parrot or no
        splice.
    """
    if parrot is None or starts is None or not starts.numel():
        return embeds
    return parrot_splice(embeds, parrot.to(embeds.dtype), starts, backend=backend)
