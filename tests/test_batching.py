"""Batching: micro-batch plans, the frozen-prefix rule, head groups and prefix buckets."""
from __future__ import annotations

import random

import torch

from sande_fast.batching import Batcher, StepItem, fast_length, label_count, spliced
from sande_fast.engine import LossEngine
from sande_fast.steps import frozen

from step_helpers import VOCAB, make_items
from tiny_models import tiny_model


def _batcher(**kw: object) -> Batcher:
    settings = dict(fast=True, token_budget=40, max_batch=3, max_waste=0.1, frozen_prefix=True,
                    min_frozen_prefix=0, sliding_window=None, model_frozen=lambda: True)
    settings.update(kw)
    return Batcher(**settings)  # type: ignore[arg-type]


def test_lengths_and_label_count() -> None:
    it = StepItem((5, 6, 7), (8, 9), 1, (10,))
    assert fast_length(it, 4) == 3 + 4 + 2 - 1
    assert fast_length(StepItem((5, 6, 7), (8, 9)), 4) == 3 + 2 - 1
    assert label_count([it, StepItem((1,), (2, 3, 4))]) == 5
    assert spliced((5, 6, 7), 1, 2, 0) == [5, 0, 0, 6, 7]
    assert spliced((5, 6, 7), 1, 0, 0) == [5, 6, 7]


def test_micro_batches_cover_every_item_once_within_the_caps() -> None:
    items = make_items(random.Random(4), 23, parrot=True)
    for fast in (False, True):
        b = _batcher(fast=fast, model_frozen=lambda: False)
        batches = b.micro_batches(items, 3)
        assert sorted(id(it) for mb in batches for it in mb) == sorted(id(it) for it in items)
        assert all(len(mb) <= 3 for mb in batches)
        if fast:
            assert all(len(mb) * max(fast_length(it, 3) for it in mb) <= 40 or len(mb) == 1
                       for mb in batches)
        else:  # the reference path keeps the order, in chunks of max_batch
            assert [it for mb in batches for it in mb] == items


def test_long_prefixes_are_bucketed_on_the_rows_after_them() -> None:
    items = make_items(random.Random(5), 12, parrot=True)
    b = _batcher(min_frozen_prefix=6)
    batches = b.micro_batches(items, 2)
    for mb in batches:
        long = [it.splice >= 6 for it in mb]
        assert all(long) or not any(long)  # long and short prefixes never share a bucket
        assert b.splits_prefix(mb, 2) == all(long)
    prefixes = [q for g in b.prefix_buckets(batches, 2) for q in g]
    want = {tuple(it.prompt[:it.splice]) for it in items if it.splice >= 6}
    assert len(prefixes) == len(set(prefixes)) and set(prefixes) == want


def test_head_groups_keep_order_and_budget() -> None:
    items = make_items(random.Random(6), 17, parrot=False)
    b = _batcher(token_budget=60, model_frozen=lambda: False)
    batches = b.micro_batches(items, 0)
    groups = b.head_groups(batches, 0)
    assert [mb for g in groups for mb in g] == batches
    for g in groups:
        rows = [len(mb) * max(fast_length(it, 0) for it in mb) for mb in g]
        assert len(g) == 1 or sum(rows) <= 60


def test_frozen_prefix_only_when_no_weight_needs_grad() -> None:
    model = tiny_model("llama", VOCAB, seed=1)
    items = make_items(random.Random(0), 4, parrot=True)
    eng = LossEngine(model, packed=False, min_frozen_prefix=0)
    assert not eng.batcher.splits_prefix(items, 3)  # stage 2: the prefix rows feed gradients
    with frozen(model):
        assert eng.batcher.splits_prefix(items, 3)
        assert not eng.batcher.splits_prefix(items, 0)
        assert not eng.batcher.splits_prefix(items[:1] + [StepItem((5, 6), (7,), -1)], 3)


def test_no_frozen_prefix_when_packed_or_off_or_within_a_window() -> None:
    items = [StepItem((5, 6, 7, 8), (9, 10), 2)]
    assert _batcher().splits_prefix(items, 2)
    assert not _batcher(frozen_prefix=False).splits_prefix(items, 2)
    assert not _batcher(fast=False).splits_prefix(items, 2)
    assert not _batcher(min_frozen_prefix=3).splits_prefix(items, 2)
    assert not _batcher(sliding_window=7).splits_prefix(items, 2)  # 4 + 2 + 2 - 1 rows
    assert _batcher(sliding_window=8).splits_prefix(items, 2)
    eng = LossEngine(tiny_model("llama", VOCAB, seed=1), packed=True)
    assert not eng.batcher.frozen_prefix and eng.batcher.max_waste == 1.0
    assert torch.is_tensor(eng.inputs(items, torch.zeros(2, 32)).ids)
