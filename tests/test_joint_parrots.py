"""Several targets' parrots trained in one pass (stage 1 and probes of several backdoors) against
each target trained alone: the same loss values, gradients, parrots, curves and probe results."""
from __future__ import annotations

import random

import pytest
import torch

from sande_fast.batching import StepItem
from sande_fast.data import EncodedPrompt
from sande_fast.engine import LossEngine
from sande_fast.probe import probe_parrots, probe_parrots_many
from sande_fast.stages import TrainRow, simulate, simulate_many
from sande_fast.steps import frozen

from step_helpers import VOCAB, close, make_items
from tiny_models import tiny_model

TARGETS = ((10, 11, 12), (20, 21), (30, 31, 32, 33))


def engines(model: torch.nn.Module) -> dict[str, LossEngine]:
    return {"fast": LossEngine(model, packed=False), "packed": LossEngine(model, packed=True),
            "plain": LossEngine(model, fast=False)}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["fast", "packed", "plain"])
def test_accumulate_each_gives_every_group_its_own_loss_and_gradient(arch: str,
                                                                     kind: str) -> None:
    model = tiny_model(arch, VOCAB, seed=3)
    rng = random.Random(5)
    groups = [make_items(rng, n, parrot=True) for n in (5, 3, 6)]
    hidden = model.get_input_embeddings().weight.shape[1]
    stack = torch.randn(3, 2, hidden, generator=torch.Generator().manual_seed(0)) * 0.3
    joint = stack.clone().requires_grad_()
    items = [StepItem(it.prompt, it.labels, it.splice, it.tail, parrot=k)
             for k, group in enumerate(groups) for it in group]
    rng.shuffle(items)  # the groups interleave in the batch
    normalizers = [sum(len(it.labels) for it in g) for g in groups]
    eng = engines(model)[kind]
    with frozen(model):
        values = eng.accumulate_each(items, joint, normalizers)
    # Reference: each group alone, its own parrot, on the plain path.
    ref = LossEngine(model, fast=False)
    for k, group in enumerate(groups):
        alone = stack[k].clone().requires_grad_()
        with frozen(model):
            value = ref.accumulate(group, alone, normalizers[k])
        assert values[k] == pytest.approx(value, rel=1e-5)
        close(joint.grad[k], alone.grad)


def test_accumulate_each_refuses_a_single_parrot() -> None:
    model = tiny_model("llama", VOCAB)
    items = make_items(random.Random(0), 2, parrot=True)
    with pytest.raises(ValueError, match="stack"):
        LossEngine(model, packed=False).accumulate_each(items, torch.zeros(2, 32), [1.0])


def _rows(seed: int) -> list[TrainRow]:
    rng = random.Random(seed)
    return [TrainRow("x", EncodedPrompt(list(ids), (2, len(ids))), ())
            for ids in ([3, 4] + [rng.randrange(40, VOCAB) for _ in range(rng.randint(4, 9))]
                        for _ in range(6))]


def test_simulate_many_gives_each_target_what_its_own_run_gives() -> None:
    # One target stops early (its stop loss is reached part way), the others run every step.
    model = tiny_model("llama", VOCAB, seed=2)
    rows = _rows(4)
    kw = dict(lr=0.2, n_tokens=2, batch_size=3)
    seeds = [1, 7, 9]
    alone = [simulate(LossEngine(model, packed=False), rows, t, steps=30, seed=s, **kw)
             for t, s in zip(TARGETS, seeds)]
    means = [[sum(c[i - 4:i + 1]) / 5 for i in range(4, 30)] for _, c in alone]
    first = min(range(3), key=lambda k: min(means[k]))
    bound = min(min(m) for k, m in enumerate(means) if k != first)  # no other goes below
    assert min(means[first]) < bound
    stops = [next(i for i, m in enumerate(means[k]) if m < bound) + 5 if k == first else 30
             for k in range(3)]
    assert 5 <= stops[first] < 30
    alone = [simulate(LossEngine(model, packed=False), rows, t, steps=30, seed=s,
                      stop_loss=bound, **kw) for t, s in zip(TARGETS, seeds)]
    joint = simulate_many(LossEngine(model, packed=False), rows, TARGETS, steps=30,
                          seeds=seeds, stop_loss=bound, **kw)
    assert [len(c) for _, c in joint] == [len(c) for _, c in alone] == stops
    for (p, c), (p_ref, c_ref) in zip(joint, alone):
        assert c == pytest.approx(c_ref, rel=1e-4)
        close(p, p_ref)


def test_probe_parrots_many_gives_each_target_its_own_probe() -> None:
    model = tiny_model("qwen2", VOCAB, seed=4)
    rows = _rows(6)
    kw = dict(tries=2, steps=12, lr=0.2, n_tokens=1, batch_size=3, max_norm=None)
    calls: dict[str, list[tuple[int, int]]] = {"alone": [], "joint": []}

    def measure(side: str, k: int):
        def run(parrot: torch.Tensor, seed: int) -> float:
            calls[side].append((k, seed))
            return float(parrot.norm()) % 1.0  # a value that depends on the parrot
        return run

    seeds = [100, 300]
    alone = [probe_parrots(LossEngine(model, packed=False), rows, t, measure("alone", k),
                           seed=s, **kw) for k, (t, s) in enumerate(zip(TARGETS, seeds))]
    joint = probe_parrots_many(LossEngine(model, packed=False), rows, TARGETS[:2],
                               [measure("joint", 0), measure("joint", 1)], seeds=seeds, **kw)
    assert sorted(calls["joint"]) == sorted(calls["alone"]) == [(0, 100), (0, 101), (1, 300),
                                                                 (1, 301)]
    for a, b in zip(joint, alone):
        assert a.asr == pytest.approx(b.asr, abs=1e-4) and a.best == b.best
        for pa, pb in zip(a.parrots, b.parrots):
            close(pa, pb)
