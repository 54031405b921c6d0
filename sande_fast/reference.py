"""The plain reference path: what the published implementation does, and the fast path's oracle.

The whole padded sequence (prompt, parrot, full response with its unsupervised tail) goes
through the Hugging Face model, logits are built for every position, and the cross-entropy is
masked to the supervised tokens. Nothing is truncated, bucketed or fused.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .adapter import ModelAdapter, context_length
from .batching import StepItem, parrot_rows, spliced
from .splice import splice_parrot

__all__ = ["plain_batch", "plain_loss", "plain_hidden"]


def plain_batch(adapter: ModelAdapter, items: Sequence[StepItem], parrot: torch.Tensor | None,
                pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input embeddings ``[B, L, H]`` (full response, the parrot written over
    ``pad_id`` placeholders one sequence at a time), next-token targets ``[B, L]`` (-100 off
    the supervised rows) and the attention mask ``[B, L]``."""
    dev = adapter.device
    rows, targets = [], []
    ctx = context_length(adapter.model)
    for it in items:
        n = parrot_rows(parrot) if it.splice >= 0 else 0
        tail = list(it.tail)
        if ctx is not None:  # the unsupervised tail may not push past the context
            tail = tail[:max(0, ctx - len(it.prompt) - len(it.labels) - n)]
        ids = spliced(it.prompt, it.splice, n, pad_id) + list(it.labels) + tail
        e = adapter.embed(torch.tensor(ids, dtype=torch.long, device=dev))
        if n:
            own = parrot if parrot.dim() == 2 else parrot[it.parrot]  # one of a stack
            e = splice_parrot(e, own, torch.tensor([it.splice], device=dev), backend="torch")
        start = len(it.prompt) + n
        t = torch.full((e.shape[0],), -100, dtype=torch.long, device=dev)
        # logits at position i predict token i+1
        t[start - 1:start - 1 + len(it.labels)] = torch.tensor(it.labels, device=dev)
        rows.append(e)
        targets.append(t)
    width = max(e.shape[0] for e in rows)
    emb = torch.stack([F.pad(e, (0, 0, 0, width - e.shape[0])) for e in rows])
    labels = torch.stack([F.pad(t, (0, width - t.shape[0]), value=-100) for t in targets])
    mask = torch.stack([F.pad(torch.ones(e.shape[0], dtype=torch.long, device=dev),
                              (0, width - e.shape[0])) for e in rows])
    return emb, labels, mask


def plain_loss(adapter: ModelAdapter, items: Sequence[StepItem], parrot: torch.Tensor | None,
               normalizer: float, pad_id: int = 0) -> torch.Tensor:
    """Summed cross-entropy of the supervised tokens from the model's full logits, divided by
    ``normalizer`` (0-dim fp32)."""
    emb, labels, mask = plain_batch(adapter, items, parrot, pad_id)
    logits = adapter.model(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss / normalizer


def plain_hidden(adapter: ModelAdapter, items: Sequence[StepItem], parrot: torch.Tensor | None,
                 pad_id: int = 0) -> torch.Tensor:
    """Final hidden states ``[R, H]`` of the supervised rows, item by item, from the base
    model's full padded forward."""
    emb, labels, mask = plain_batch(adapter, items, parrot, pad_id)
    hidden = adapter.hidden_states(emb, attention_mask=mask)
    return hidden[labels != -100]
