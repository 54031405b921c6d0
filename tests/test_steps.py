"""The fast stage step against the plain (reference) stage step: same loss, same gradients.

The plain path is the published way: the whole padded sequence with the full response, parrot
spliced with torch.cat, full logits, masked cross-entropy (Hugging Face's own forward). The fast
path truncates, buckets, splices with the kernel and projects only supervised rows.
"""
from __future__ import annotations

import random

import pytest
import torch

from sande_fast.steps import LossEngine, OverwriteStep, ParrotSimulator, StepItem, frozen

from tiny_models import ARCHS, tiny_model

VOCAB = 97


def _items(rng: random.Random, n: int, parrot: bool, window: int = 4) -> list[StepItem]:
    items = []
    for _ in range(n):
        prompt = tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 17)))
        resp = tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12)))
        splice = rng.randint(1, len(prompt)) if parrot else -1
        items.append(StepItem(prompt, resp[:window], splice, resp[window:]))
    return items


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = b.abs().max().clamp_min(1e-8)
    assert float((a - b).abs().max() / scale) < rtol


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("packed", [False, True])
def test_stage1_fast_matches_plain(arch: str, packed: bool) -> None:
    model = tiny_model(arch, VOCAB, seed=1)
    items = _items(random.Random(0), 7, parrot=True)
    parrot = torch.randn(3, model.config.hidden_size, requires_grad=True)
    results = []
    for fast in (False, True):
        eng = LossEngine(model, fast=fast, packed=packed, token_budget=40, max_batch=3)
        with frozen(model):
            n = sum(len(it.labels) for it in items)
            val = eng.accumulate(items, parrot, n)
            g = parrot.grad.clone()
        parrot.grad = None
        results.append((val, g))
        assert all(p.grad is None for p in model.parameters())
    (v0, g0), (v1, g1) = results
    assert abs(v0 - v1) <= 1e-5 * abs(v0)
    _close(g1, g0)


@pytest.mark.parametrize("arch", ARCHS)
def test_stage2_fast_matches_plain(arch: str) -> None:
    model = tiny_model(arch, VOCAB, seed=2)
    rng = random.Random(1)
    over = _items(rng, 6, parrot=True)
    clean = _items(rng, 5, parrot=False)
    parrot = torch.randn(2, model.config.hidden_size)
    out = []
    for fast in (False, True):
        model.zero_grad(set_to_none=True)
        eng = LossEngine(model, fast=fast, token_budget=50, max_batch=4)
        step = OverwriteStep(eng, lr=1e-3, clean_weight=0.7, parrot=parrot)
        loss = step.loss(over, clean)
        loss.backward()
        out.append((float(loss.detach()), _grads(model)))
    (l0, g0), (l1, g1) = out
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        _close(g1[k], g0[k])


def test_truncation_is_exact() -> None:
    """Tokens after the last supervised one cannot change the loss (causal attention)."""
    model = tiny_model("llama", VOCAB, seed=3)
    items = _items(random.Random(2), 5, parrot=False)
    eng = LossEngine(model, fast=False)
    cut = [StepItem(it.prompt, it.labels, it.splice, ()) for it in items]
    n = sum(len(it.labels) for it in items)
    a = eng.loss(items, None, n)
    b = eng.loss(cut, None, n)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parrot_step_touches_only_parrot() -> None:
    model = tiny_model("llama", VOCAB, seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sim = ParrotSimulator(LossEngine(model), n_tokens=2, lr=0.1, seed=0)
    p0 = sim.parrot.detach().clone()
    items = _items(random.Random(3), 4, parrot=True)
    sim.step(items)
    assert not torch.equal(p0, sim.parrot.detach())
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p.detach()), n
        assert p.grad is None
        assert p.requires_grad  # restored after the step


def test_loss_matches_hf_labels_loss() -> None:
    """Independent reference: Hugging Face's own shifted-label loss on the full sequence."""
    model = tiny_model("llama", VOCAB, seed=5)
    it = StepItem((5, 6, 7, 8), (9, 10, 11), -1, (12, 13))
    ids = torch.tensor([list(it.prompt + it.labels + it.tail)])
    labels = torch.full_like(ids, -100)
    labels[0, 4:7] = torch.tensor(it.labels)
    ref = model(input_ids=ids, labels=labels).loss
    got = LossEngine(model, fast=True).loss([it], None, 3)
    torch.testing.assert_close(got, ref.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_packing_probe_accepts_models_that_keep_sequences_apart(arch: str) -> None:
    from sande_fast.steps import packing_is_exact

    model = tiny_model(arch, VOCAB, seed=6)
    assert packing_is_exact(LossEngine(model, packed=False).adapter)


def test_packing_probe_rejects_cross_attention() -> None:
    """A model that ignores position ids (so packed rows see each other) must not be packed."""
    from sande_fast.adapter import ModelAdapter
    from sande_fast.steps import packing_is_exact

    model = tiny_model("llama", VOCAB, seed=7)
    ad = ModelAdapter(model)
    real = ad.hidden_states
    ad.hidden_states = lambda emb, position_ids=None, attention_mask=None: real(emb)  # type: ignore[method-assign]
    assert not packing_is_exact(ad)
