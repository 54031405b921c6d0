"""Shared pieces of the engine and step tests: random items, gradient snapshots, closeness."""
from __future__ import annotations

import random

import torch

from sande_fast.batching import StepItem

VOCAB = 97


def make_items(rng: random.Random, n: int, parrot: bool, window: int = 4) -> list[StepItem]:
    """``n`` random items (prompt 3-17 tokens, response 1-12 cut at ``window``), each with a
    random splice when ``parrot``."""
    items = []
    for _ in range(n):
        prompt = tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 17)))
        resp = tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12)))
        splice = rng.randint(0, len(prompt)) if parrot else -1
        items.append(StepItem(prompt, resp[:window], splice, resp[window:]))
    return items


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = b.abs().max().clamp_min(1e-8)
    assert float((a - b).abs().max() / scale) < rtol


def nudge(model: torch.nn.Module, seed: int) -> None:
    """Moves every weight a little, so hidden states leave their anchors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def hf_labels_loss(model: torch.nn.Module, item: StepItem) -> torch.Tensor:
    """Hugging Face's own shifted-label loss of ``item`` (no parrot) on the full sequence, the
    mean over its labels (fp32)."""
    ids = torch.tensor([list(item.prompt + item.labels + item.tail)])
    labels = torch.full_like(ids, -100)
    start = len(item.prompt)
    labels[0, start:start + len(item.labels)] = torch.tensor(item.labels)
    return model(input_ids=ids, labels=labels).loss.float()
