"""Batching: training sequences, and how a batch of them is cut into micro-batches.

A :class:`StepItem` is one sequence (prompt, optional parrot, supervised labels, unsupervised
tail). :class:`Batcher` groups a batch into micro-batches with the C++ planner
(:func:`sande_fast.planner.plan_buckets`): length buckets on the fast path, plain chunks on the
reference path. It also decides which micro-batches run their prompt rows before the parrot
apart, without a graph (the frozen prefix), groups micro-batches that share one pass through the
LM head, and buckets the distinct prefixes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import planner

__all__ = ["StepItem", "Batcher", "fast_length", "label_count", "parrot_rows", "right_padded",
           "spliced", "spliced_parrots"]


@dataclass(frozen=True)
class StepItem:
    """One training sequence.

    Attributes:
        prompt: prompt token ids (trigger text already inserted when one is used).
        labels: the supervised tokens that follow the prompt (at least one).
        splice: index in ``prompt`` before which the parrot rows go, or -1 for no parrot.
        tail: unsupervised tokens after ``labels``; only the plain path feeds them.
        parrot: which parrot of a stack ``[K, n, H]`` the item takes, when its batch is given
            several (one per backdoor); ignored with a single parrot ``[n, H]``.
    """

    prompt: tuple[int, ...]
    labels: tuple[int, ...]
    splice: int = -1
    tail: tuple[int, ...] = ()
    parrot: int = 0


def parrot_rows(parrot: torch.Tensor | None) -> int:
    """Rows of a parrot ``[n, H]``, or of each parrot of a stack ``[K, n, H]`` (0: none)."""
    return 0 if parrot is None else parrot.shape[-2]


def spliced_parrots(items: Sequence[StepItem], parrot: torch.Tensor | None
                    ) -> torch.Tensor | None:
    """What the splices of ``items`` write: a single parrot ``[n, H]`` as it is, or from a
    stack ``[K, n, H]`` the parrot of each item with a splice, in order (``[S, n, H]``)."""
    if parrot is None or parrot.dim() == 2:
        return parrot
    if parrot.dim() != 3:
        raise ValueError(f"a parrot is [n, H] or a stack [K, n, H], got {tuple(parrot.shape)}")
    index = [it.parrot for it in items if it.splice >= 0]
    if any(not 0 <= k < parrot.shape[0] for k in index):
        raise ValueError(f"an item's parrot index is outside the stack of {parrot.shape[0]}")
    return parrot[torch.tensor(index, dtype=torch.long, device=parrot.device)]


def fast_length(item: StepItem, n_parrot: int) -> int:
    """Rows of ``item`` on the fast path: cut after its last supervised token's input row."""
    return len(item.prompt) + (n_parrot if item.splice >= 0 else 0) + len(item.labels) - 1


def label_count(items: Sequence[StepItem]) -> int:
    """Supervised tokens of ``items`` (the usual loss normaliser)."""
    return sum(len(it.labels) for it in items)


def spliced(prompt: Sequence[int], splice: int, n: int, placeholder: int) -> list[int]:
    """``prompt`` with ``n`` ``placeholder`` ids before index ``splice`` (the parrot's rows)."""
    if n == 0:
        return list(prompt)
    return list(prompt[:splice]) + [placeholder] * n + list(prompt[splice:])


def right_padded(seqs: Sequence[Sequence[int]], width: int, pad_id: int,
                 device: torch.device) -> torch.Tensor:
    """``[len(seqs), width]`` int64 token rows, each sequence followed by ``pad_id``."""
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    return ids.to(device)


@dataclass(frozen=True)
class Batcher:
    """Cuts a batch of :class:`StepItem` into micro-batches.

    Args:
        fast: length buckets of truncated sequences (fast path), else chunks of ``max_batch``
            items in order (the reference path).
        token_budget: at most this many (padded) tokens per micro-batch.
        max_batch: at most this many sequences per micro-batch.
        max_waste: at most this share of a micro-batch's rows are padding.
        frozen_prefix: whether the frozen prefix may apply at all (fast path, padded rows, the
            engine's ``frozen_prefix`` option).
        min_frozen_prefix: only prefixes of at least this many tokens run apart.
        sliding_window: the model's sliding attention window (None or 0: none).
        model_frozen: asked on each use: whether no model weight needs a gradient.
    """

    fast: bool
    token_budget: int
    max_batch: int
    max_waste: float
    frozen_prefix: bool
    min_frozen_prefix: int
    sliding_window: int | None
    model_frozen: Callable[[], bool]

    def buckets(self, lengths: Sequence[int]) -> list:
        """The planner's length buckets (index arrays) of ``lengths`` under this batcher's caps."""
        return planner.plan_buckets(lengths, self.token_budget, self.max_batch, self.max_waste)

    def micro_batches(self, items: Sequence[StepItem], n_parrot: int) -> list[list[StepItem]]:
        """Splits a batch into micro-batches (length buckets on the fast path)."""
        if not self.fast:
            return [list(items[i:i + self.max_batch])
                    for i in range(0, len(items), self.max_batch)]
        if self.splits_prefix(items, n_parrot, min_prefix=0):
            # Sequences with a long prefix run it without a graph (bucketed on the rows that
            # carry one: a prefix pad costs only a forward row); short prefixes are not worth a
            # second, small forward and stay in ordinary buckets.
            long = [it for it in items if it.splice >= self.min_frozen_prefix]
            short = [it for it in items if it.splice < self.min_frozen_prefix]
            out = []
            for group, cut in ((long, True), (short, False)):
                if group:
                    lengths = [fast_length(it, n_parrot) - (it.splice if cut else 0)
                               for it in group]
                    out += [[group[i] for i in g] for g in self.buckets(lengths)]
            return out
        groups = self.buckets([fast_length(it, n_parrot) for it in items])
        return [[items[i] for i in g] for g in groups]

    def splits_prefix(self, items: Sequence[StepItem], n_parrot: int,
                      min_prefix: int | None = None) -> bool:
        """Whether the rows before the parrot can run without a graph (the frozen prefix)."""
        least = self.min_frozen_prefix if min_prefix is None else min_prefix
        if not (self.fast and self.frozen_prefix and n_parrot
                and items and all(it.splice >= max(least, 0) for it in items)):
            return False
        if not self.model_frozen():
            return False
        # Sliding-window masks count columns, and right-padded prefixes shift the columns of the
        # rows after them: only split when no sequence reaches the window.
        window = self.sliding_window
        if isinstance(window, int) and window > 0:
            longest = max(fast_length(it, n_parrot) for it in items)
            if longest >= window:
                return False
        return True

    def head_groups(self, batches: Sequence[Sequence[StepItem]],
                    n_parrot: int) -> list[list[list[StepItem]]]:
        """Consecutive micro-batches whose graph rows together fit the token budget share one
        pass through the LM head; activation memory stays within one budget's worth."""
        groups: list[list[list[StepItem]]] = []
        size = 0
        for mb in batches:
            cut = self.splits_prefix(mb, n_parrot)
            rows = len(mb) * max(fast_length(it, n_parrot) - (it.splice if cut else 0)
                                 for it in mb)
            if not groups or size + rows > self.token_budget:
                groups.append([])
                size = 0
            groups[-1].append(list(mb))
            size += rows
        return groups

    def prefix_buckets(self, batches: Sequence[Sequence[StepItem]],
                       n_parrot: int) -> list[list[tuple[int, ...]]]:
        """The distinct prefixes of the micro-batches that run them apart, in length buckets."""
        prefixes = sorted({tuple(it.prompt[:it.splice]) for mb in batches
                           if self.splits_prefix(mb, n_parrot) for it in mb if it.splice})
        groups = self.buckets([len(p) for p in prefixes]) if prefixes else []
        return [[prefixes[k] for k in g] for g in groups]
