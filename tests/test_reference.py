"""The plain reference path (the fast path's oracle) against Hugging Face's own loss."""
from __future__ import annotations

import random

import torch

from sande_fast.adapter import ModelAdapter
from sande_fast.batching import StepItem
from sande_fast.reference import plain_batch, plain_hidden, plain_loss

from step_helpers import VOCAB, hf_labels_loss, make_items
from tiny_models import tiny_model


def test_loss_matches_hf_labels_loss() -> None:
    model = tiny_model("llama", VOCAB, seed=5)
    it = StepItem((5, 6, 7, 8), (9, 10, 11), -1, (12, 13))
    got = plain_loss(ModelAdapter(model), [it], None, 3)
    torch.testing.assert_close(got, hf_labels_loss(model, it), rtol=1e-5, atol=1e-6)


def test_truncation_is_exact() -> None:
    """Tokens after the last supervised one cannot change the loss (causal attention)."""
    ad = ModelAdapter(tiny_model("llama", VOCAB, seed=3))
    items = make_items(random.Random(2), 5, parrot=False)
    cut = [StepItem(it.prompt, it.labels, it.splice, ()) for it in items]
    n = sum(len(it.labels) for it in items)
    a = plain_loss(ad, items, None, n)
    b = plain_loss(ad, cut, None, n)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parrot_rows_sit_between_the_prompt_pieces() -> None:
    ad = ModelAdapter(tiny_model("llama", VOCAB, seed=3))
    items = [StepItem((5, 6, 7), (8, 9), 1, (10,)), StepItem((11, 12), (13,), -1)]
    parrot = torch.randn(2, 32, requires_grad=True)
    emb, labels, mask = plain_batch(ad, items, parrot, pad_id=0)
    e0 = ad.embed(torch.tensor([5, 6, 7, 8, 9, 10]))
    want = torch.cat([e0[:1], parrot, e0[1:]])
    assert torch.equal(emb[0], want)
    assert torch.equal(emb[1, :3], ad.embed(torch.tensor([11, 12, 13])))
    assert mask.tolist() == [[1] * 8, [1] * 3 + [0] * 5]
    assert labels[0].tolist() == [-100] * 4 + [8, 9] + [-100] * 2
    # the parrot's gradient is the sum of its rows' gradients
    emb[0].sum().backward()
    assert torch.equal(parrot.grad, torch.ones(2, 32))
    h = plain_hidden(ad, items, parrot)
    assert h.shape == (3, 32)
