"""The step objects: parrot simulation, overwrite with retention anchors, the optimizers."""
from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from sande_fast.engine import LossEngine
from sande_fast.steps import Anchors, CalibratedSGD, OverwriteStep, ParrotSimulator, StepItem

from step_helpers import VOCAB, make_items, nudge
from tiny_models import tiny_model


def test_retention_term_matches_brute_force() -> None:
    """Independent reference: the base model's own last hidden states at the label rows."""
    model = tiny_model("llama", VOCAB, seed=7)
    clean = make_items(random.Random(5), 5, parrot=False)

    def states() -> list[torch.Tensor]:
        out = []
        with torch.no_grad():
            for it in clean:
                ids = torch.tensor([list(it.prompt + it.labels)])
                h = model.model(input_ids=ids).last_hidden_state[0]
                out.append(h[len(it.prompt) - 1:len(it.prompt) - 1 + len(it.labels)])
        return out

    h0 = states()
    eng = LossEngine(model, fast=True)
    anchors = Anchors(eng, clean)
    nudge(model, 2)
    h1 = states()
    rows = torch.cat(h0)
    scale = float(rows.pow(2).sum(-1).mean())
    want_retain = float(torch.cat([a - b for a, b in zip(h1, h0)]).pow(2).sum(-1).mean()) / scale
    n = sum(len(it.labels) for it in clean)
    with torch.no_grad():
        ce = float(eng.loss(clean, None, n))
        got = float(OverwriteStep(eng, clean_weight=1.0, retain_weight=3.0,
                                  anchors=anchors).loss([], clean))
    assert want_retain > 1e-4  # the nudge moved the states
    assert abs((got - ce) - 3.0 * want_retain) <= 1e-4 * 3.0 * want_retain
    # Unchanged weights: the term is zero.
    anchors_now = Anchors(eng, clean)
    with torch.no_grad():
        same = float(OverwriteStep(eng, clean_weight=1.0, retain_weight=3.0,
                                   anchors=anchors_now).loss([], clean))
    assert abs(same - ce) <= 1e-6 * ce


def test_retention_needs_anchors_for_every_clean_item() -> None:
    model = tiny_model("llama", VOCAB, seed=8)
    eng = LossEngine(model)
    clean = make_items(random.Random(6), 4, parrot=False)
    with pytest.raises(ValueError, match="anchors"):
        OverwriteStep(eng, retain_weight=1.0)
    with pytest.raises(ValueError, match="clean_weight"):
        OverwriteStep(eng, clean_weight=0.0, retain_weight=1.0, anchors=Anchors(eng, clean))
    step = OverwriteStep(eng, retain_weight=1.0, anchors=Anchors(eng, clean[:2]))
    with pytest.raises(KeyError, match="anchor"):
        step.step([], clean)
    with pytest.raises(ValueError, match="parrot"):
        eng.supervised_states(make_items(random.Random(7), 2, parrot=True))


def _rms(tensors: list[torch.Tensor]) -> float:
    return float(torch.cat([t.flatten() for t in tensors]).pow(2).mean().sqrt())


def test_calibrated_sgd_matches_hand_written_momentum_sgd() -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen, requires_grad=True),
              torch.randn(7, generator=gen, requires_grad=True)]
    ref = [p.detach().clone() for p in params]
    opt = CalibratedSGD(params, lr=1e-2, momentum=0.9)
    # Gradients that grow, then shrink: the rate follows the largest RMS so far.
    scales = [0.5, 2.0, 1.0, 0.01]
    buf: list[torch.Tensor] | None = None
    peak = 0.0
    for scale in scales:
        grads = [torch.randn(p.shape, generator=gen) * scale for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        peak = max(peak, _rms(grads))
        lr = 1e-2 / peak
        buf = [g.clone() for g in grads] if buf is None else [
            0.9 * b + g for b, g in zip(buf, grads)]
        ref = [r - lr * b for r, b in zip(ref, buf)]
        for p, r in zip(params, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-6, atol=1e-7)
    assert opt.peak == pytest.approx(peak)


def test_calibrated_sgd_first_update_has_rms_lr_and_waits_for_a_gradient() -> None:
    p = torch.randn(64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    start = p.detach().clone()
    opt = CalibratedSGD([p], lr=3e-3)
    p.grad = torch.zeros_like(p)
    opt.step()  # no gradient yet: nothing moves, nothing is divided by zero
    assert torch.equal(p.detach(), start) and opt.peak == 0.0
    p.grad = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 1e-6
    opt.step()
    assert _rms([p.detach() - start]) == pytest.approx(3e-3, rel=1e-5)


def test_overwrite_step_optimizer_choice() -> None:
    eng = LossEngine(tiny_model("llama", VOCAB, seed=8))
    assert isinstance(OverwriteStep(eng, optimizer="sgd").optimizer, CalibratedSGD)
    assert isinstance(OverwriteStep(eng).optimizer, torch.optim.AdamW)
    with pytest.raises(ValueError, match="unknown optimizer"):
        OverwriteStep(eng, optimizer="rmsprop")


def test_parrot_step_touches_only_parrot() -> None:
    model = tiny_model("llama", VOCAB, seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sim = ParrotSimulator(LossEngine(model), n_tokens=2, lr=0.1, seed=0)
    p0 = sim.parrot.detach().clone()
    items = make_items(random.Random(3), 4, parrot=True)
    sim.step(items)
    assert not torch.equal(p0, sim.parrot.detach())
    for n, p in model.named_parameters():
        assert torch.equal(before[n], p.detach()), n
        assert p.grad is None
        assert p.requires_grad  # restored after the step


def test_steps_reexports_the_engine_names() -> None:
    from sande_fast import batching, engine

    assert StepItem is batching.StepItem and LossEngine is engine.LossEngine


def _hf_parrot_loss_sum(model: torch.nn.Module, item: StepItem,
                        parrot: torch.Tensor) -> torch.Tensor:
    """Hugging Face's own loss of ``item`` with ``parrot`` spliced before ``item.splice``, summed
    over its labels (full sequence, no truncation)."""
    emb = model.get_input_embeddings()
    before = emb(torch.tensor(item.prompt[:item.splice], dtype=torch.long))
    after = emb(torch.tensor(item.prompt[item.splice:] + item.labels + item.tail,
                             dtype=torch.long))
    x = torch.cat([before, parrot.to(before.dtype), after])[None]
    labels = torch.full((1, x.shape[1]), -100, dtype=torch.long)
    start = len(item.prompt) + parrot.shape[0]
    labels[0, start:start + len(item.labels)] = torch.tensor(item.labels)
    return model(inputs_embeds=x, labels=labels).loss.float() * len(item.labels)


@pytest.mark.parametrize("fast", [True, False])
def test_several_parrots_share_one_overwrite_step(fast: bool) -> None:
    """Each overwrite item takes its own parrot; the loss is the mean over every overwrite
    label plus the clean term, as a brute-force sum of Hugging Face losses gives it."""
    model = tiny_model("llama", VOCAB, seed=11)
    rng = random.Random(9)
    overwrite = make_items(rng, 6, parrot=True)
    clean = make_items(rng, 3, parrot=False)
    hidden = model.get_input_embeddings().weight.shape[1]
    parrots = [torch.randn(3, hidden, generator=torch.Generator().manual_seed(s)) * 0.02
               for s in (1, 2)]
    which = [0, 1, 1, 0, 1, 0]
    step = OverwriteStep(LossEngine(model, fast=fast), lr=1e-3, clean_weight=2.0,
                         parrot=parrots)
    got = step.loss(overwrite, clean, parrot_index=which)
    got.backward()
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    n_over = sum(len(it.labels) for it in overwrite)
    n_clean = sum(len(it.labels) for it in clean)
    want = sum(_hf_parrot_loss_sum(model, it, parrots[k]) for it, k in zip(overwrite, which))
    want = want / n_over
    from step_helpers import hf_labels_loss
    want = want + 2.0 * sum(hf_labels_loss(model, it) * len(it.labels) for it in clean) / n_clean
    want.backward()
    assert abs(float(got) - float(want)) <= 1e-4 * float(want)
    for n, p in model.named_parameters():
        scale = p.grad.abs().max().clamp_min(1e-8)
        assert float((got_grads[n] - p.grad).abs().max() / scale) < 1e-3, n
    # One batch plan for every parrot: the overwrite items go to the engine in one call, with
    # the parrots stacked and each item naming its own.
    calls = []
    real = step.engine.loss

    def spy(items: Any, parrot: Any, *a: Any, **k: Any) -> Any:
        calls.append((len(items), None if parrot is None else tuple(parrot.shape)))
        return real(items, parrot, *a, **k)

    step.engine.loss = spy
    step.loss(overwrite, clean, parrot_index=which)
    del step.engine.loss
    assert calls[0] == (6, (2, 3, hidden)) and len(calls) == 2  # overwrite, then clean
    # Taking the parrots the other way round changes the loss: the index is honoured.
    swapped = step.loss(overwrite, clean, parrot_index=[1 - k for k in which])
    assert abs(float(swapped) - float(got)) > 1e-6
    with pytest.raises(ValueError, match="one entry per overwrite item"):
        step.loss(overwrite, clean, parrot_index=which[:-1])
    with pytest.raises(ValueError, match="parrot_index must lie in"):
        step.loss(overwrite, clean, parrot_index=[2] * len(which))
    # Rows carrying two backdoors each: the overwrite term is the sum of the two means, so each
    # mapping weighs what a lone one would.
    with torch.no_grad():
        over = sum(_hf_parrot_loss_sum(model, it, parrots[k]) for it, k in zip(overwrite, which))
        clean_term = 2.0 * sum(hf_labels_loss(model, it) * len(it.labels)
                               for it in clean) / n_clean
        two = step.loss(overwrite, clean, parrot_index=which, backdoors=2)
    want_two = 2 * over / n_over + clean_term
    assert abs(float(two) - float(want_two)) <= 1e-4 * float(want_two)


def test_parrots_of_different_lengths_run_as_groups() -> None:
    """Parrots that cannot be stacked (different row counts) still give the brute-force loss."""
    model = tiny_model("llama", VOCAB, seed=12)
    rng = random.Random(10)
    overwrite = make_items(rng, 4, parrot=True)
    hidden = model.get_input_embeddings().weight.shape[1]
    parrots = [torch.randn(n, hidden, generator=torch.Generator().manual_seed(n)) * 0.02
               for n in (3, 2)]
    which = [1, 0, 0, 1]
    step = OverwriteStep(LossEngine(model), lr=1e-3, clean_weight=1.0, parrot=parrots)
    with torch.no_grad():
        got = step.loss(overwrite, [], parrot_index=which)
        want = sum(_hf_parrot_loss_sum(model, it, parrots[k]) for it, k in zip(overwrite, which))
    want = want / sum(len(it.labels) for it in overwrite)
    assert abs(float(got) - float(want)) <= 1e-4 * float(want)


def test_adamw_takes_the_fused_kernel_with_the_multi_tensor_update() -> None:
    from sande_fast.steps import make_optimizer

    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (300, 7, 1)]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = make_optimizer("adamw", ours, lr=1e-2, weight_decay=0.01)
    ref = torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.01, foreach=True)
    assert opt.defaults["fused"] is True
    for _ in range(6):
        for a, b in zip(ours, plain):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-6, rtol=1e-5)
    # An integer tensor (or a sharded one) keeps the default path.
    mixed = [torch.nn.Parameter(torch.zeros(2)), torch.zeros(2, dtype=torch.long)]
    from sande_fast.steps import _fused_adamw_applies
    assert not _fused_adamw_applies(mixed)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_a_non_finite_gradient_stops_the_step(bad: float | None) -> None:
    from sande_fast.steps import NonFiniteError, _check_finite

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (5, 300, 1)]
    for p in params:
        p.grad = torch.randn(p.shape)
    params.append(torch.nn.Parameter(torch.zeros(2)))  # no gradient: skipped
    if bad is None:
        _check_finite(1.0, params, "step 1")
        return
    params[1].grad[123] = bad
    with pytest.raises(NonFiniteError, match="step 1: a gradient is not finite"):
        _check_finite(1.0, params, "step 1")
