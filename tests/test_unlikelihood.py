"""Stage 2's unlikelihood term: -log(1 - p(token)) on the target's tokens after the parrot (or the
trigger), against brute force on the model's own logits."""
from __future__ import annotations

import math
import random

import pytest
import torch

from sande_fast.adapter import ModelAdapter
from sande_fast.batching import StepItem
from sande_fast.data import EncodedPrompt
from sande_fast.engine import LossEngine
from sande_fast.options import SanitizeConfig, resolve
from sande_fast.stages import TrainRow, eliminate
from sande_fast.steps import OverwriteStep

from step_helpers import VOCAB, close, grads, make_items
from tiny_models import tiny_model


def _embeds(model: torch.nn.Module, item: StepItem, parrot: torch.Tensor | None) -> torch.Tensor:
    """The item's input embeddings built by hand: prompt, parrot at its splice, labels."""
    emb = model.get_input_embeddings()
    prompt = emb(torch.tensor(item.prompt))
    if item.splice >= 0:
        own = parrot if parrot.dim() == 2 else parrot[item.parrot]
        prompt = torch.cat([prompt[:item.splice], own, prompt[item.splice:]])
    return torch.cat([prompt, emb(torch.tensor(item.labels))])[None]


def brute_unlikelihood(model: torch.nn.Module, items: list[StepItem],
                       parrot: torch.Tensor | None, normalizer: float) -> torch.Tensor:
    """Sum over the items' labels of -log(1 - softmax(logits)[label]) from the model's full
    logits, in float64, divided by ``normalizer``."""
    total = torch.zeros((), dtype=torch.float64)
    for it in items:
        x = _embeds(model, it, parrot)
        logits = model(inputs_embeds=x).logits[0].double()
        start = x.shape[1] - len(it.labels)  # the first label's row
        p = torch.softmax(logits[start - 1:start - 1 + len(it.labels)], -1)
        p_label = p.gather(1, torch.tensor(it.labels)[:, None])[:, 0]
        total = total - torch.log1p(-p_label).sum()
    return total / normalizer


def test_head_unlikelihood_matches_brute_force_and_stays_finite_near_one() -> None:
    model = tiny_model("llama", VOCAB, seed=1)
    adapter = ModelAdapter(model)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 32, generator=gen)
    labels = torch.randint(0, VOCAB, (7,), generator=gen)
    got = adapter.head_unlikelihood(hidden, labels, 3.0).detach()
    logits = model.lm_head(hidden).double()
    p = torch.softmax(logits, -1).gather(1, labels[:, None])[:, 0]
    assert float(got) == pytest.approx(float(-torch.log1p(-p).sum() / 3), rel=1e-5)
    # A label the head gives nearly all the mass: p rounds to 1 in fp32, the loss stays finite
    # and equals log(e^M + V - 1) - log(V - 1) for a logit M above V - 1 zeros.
    weight = torch.zeros(VOCAB, 32)
    weight[5, 0] = 40.0
    adapter_one = ModelAdapter(tiny_model("llama", VOCAB, seed=1))
    with torch.no_grad():
        adapter_one.head.weight.copy_(weight)
    h = torch.zeros(1, 32)
    h[0, 0] = 1.0
    h.requires_grad_()
    value = adapter_one.head_unlikelihood(h, torch.tensor([5]), 1.0)
    want = math.log(math.exp(40.0) + VOCAB - 1) - math.log(VOCAB - 1)
    assert math.isfinite(float(value))
    assert float(value) == pytest.approx(want, rel=1e-5)
    value.backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["fast", "packed", "plain"])
def test_engine_unlikelihood_value_and_gradient_match_brute_force(arch: str, kind: str) -> None:
    model = tiny_model(arch, VOCAB, seed=4)
    items = make_items(random.Random(3), 6, parrot=True)
    hidden = model.get_input_embeddings().weight.shape[1]
    parrot = torch.randn(3, hidden, generator=torch.Generator().manual_seed(2)) * 0.3
    eng = {"fast": LossEngine(model, packed=False, token_budget=64),
           "packed": LossEngine(model, packed=True),
           "plain": LossEngine(model, fast=False)}[kind]
    n = 5.0
    model.zero_grad()
    value = eng.accumulate(items, parrot, n, weight=2.0, unlikely=True)
    got = grads(model)
    model.zero_grad()
    want = brute_unlikelihood(model, items, parrot, n) * 2.0
    want.backward()
    assert value == pytest.approx(float(want), rel=1e-4)
    ref = grads(model)
    assert got.keys() == ref.keys()
    for name in ref:
        close(got[name], ref[name], rtol=1e-3)
    # The graph-bearing loss gives the same value.
    with torch.no_grad():
        assert float(eng.loss(items, parrot, n, unlikely=True)) == pytest.approx(
            float(want) / 2.0, rel=1e-4)


def test_overwrite_step_adds_the_weighted_unlikelihood_of_its_twins() -> None:
    model = tiny_model("llama", VOCAB, seed=6)
    rng = random.Random(9)
    overwrite = make_items(rng, 4, parrot=True)
    clean = [StepItem(it.prompt, it.labels, -1, it.tail) for it in overwrite]
    target = (40, 41, 42)
    twins = [StepItem(it.prompt, target, it.splice) for it in overwrite]
    parrot = torch.randn(2, 32, generator=torch.Generator().manual_seed(1)) * 0.3
    eng = LossEngine(model)
    plain = OverwriteStep(eng, clean_weight=3.0, parrot=parrot)
    with_ul = OverwriteStep(eng, clean_weight=3.0, parrot=parrot, unlikely_weight=0.5)
    with torch.no_grad():
        base = float(plain.loss(overwrite, clean))
        total = float(with_ul.loss(overwrite, clean, unlikely=twins))
        ul = float(brute_unlikelihood(model, twins, parrot, 3 * len(twins)))
    assert total - base == pytest.approx(0.5 * ul, rel=1e-4)
    with pytest.raises(ValueError, match="unlikely_weight"):
        plain.loss(overwrite, clean, unlikely=twins)
    with pytest.raises(ValueError, match="at least 0"):
        OverwriteStep(eng, unlikely_weight=-1.0)


def _rows(rng: random.Random, n: int) -> list[TrainRow]:
    rows = []
    for _ in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 10))]
        resp = tuple(rng.randrange(3, VOCAB) for _ in range(5))
        rows.append(TrainRow("t", EncodedPrompt(ids, (1, len(ids) - 1)), resp))
    return rows


def test_eliminate_gives_every_overwrite_item_a_twin_with_its_own_target(monkeypatch) -> None:
    seen = {}

    def spy(self, overwrite, clean, where="", parrot_index=None, backdoors=1, unlikely=(),
            unlikely_index=None):
        seen.update(overwrite=list(overwrite), unlikely=list(unlikely),
                    parrot_index=parrot_index, unlikely_index=unlikely_index,
                    weight=self.unlikely_weight)
        return 0.0

    monkeypatch.setattr(OverwriteStep, "step", spy)
    model = tiny_model("llama", VOCAB, seed=2)
    eng = LossEngine(model)
    parrots = [torch.zeros(2, 32), torch.ones(2, 32)]
    targets = [(50, 51), (60, 61, 62)]
    eliminate(eng, _rows(random.Random(1), 6), steps=1, lr=1e-4, batch_size=3, seed=0,
              window=4, clean_weight=1.0, parrot=parrots, unlikely=targets, unlikely_weight=2.0)
    assert seen["weight"] == 2.0
    assert len(seen["unlikely"]) == len(seen["overwrite"]) == 6
    for item, twin, k in zip(seen["overwrite"], seen["unlikely"], seen["parrot_index"]):
        assert (twin.prompt, twin.splice, twin.tail) == (item.prompt, item.splice, ())
        assert twin.labels == targets[k]
    assert seen["unlikely_index"] == seen["parrot_index"]
    with pytest.raises(ValueError, match="one non-empty target per backdoor"):
        eliminate(eng, _rows(random.Random(1), 6), steps=1, lr=1e-4, batch_size=3, seed=0,
                  window=4, clean_weight=1.0, parrot=parrots, unlikely=targets[:1],
                  unlikely_weight=2.0)
    # Off: no twins.
    eliminate(eng, _rows(random.Random(1), 6), steps=1, lr=1e-4, batch_size=3, seed=0,
              window=4, clean_weight=1.0, parrot=parrots, unlikely=targets)
    assert seen["unlikely"] == [] and seen["weight"] == 0.0


def test_unlikelihood_lowers_the_target_after_the_parrot_more_than_cross_entropy_alone() -> None:
    """Same rows, parrot, rate and steps; the target's probability after the parrot falls
    further with the term than with cross-entropy toward the clean answer alone."""
    rows = _rows(random.Random(4), 8)
    target = (50, 51, 52)
    parrot = torch.randn(2, 32, generator=torch.Generator().manual_seed(3)) * 0.5
    check = [StepItem(tuple(r.prompt.ids), target, 2) for r in rows]

    def after(weight: float) -> float:
        model = tiny_model("llama", VOCAB, seed=5)
        eng = LossEngine(model)
        eliminate(eng, rows, steps=6, lr=3e-3, batch_size=4, seed=0, window=4,
                  clean_weight=1.0, parrot=parrot, unlikely=[target], unlikely_weight=weight)
        with torch.no_grad():
            return float(eng.loss(check, parrot, len(check) * len(target)))  # mean CE

    assert after(1.0) > after(0.0) + 0.1


def test_unlikely_weight_auto_is_on_from_50m_parameters() -> None:
    cfg = SanitizeConfig()
    big = resolve(cfg, "sande", n_params=135_000_000, context=2048, chat_template=True)
    small = resolve(cfg, "sande", n_params=1_000_000, context=2048, chat_template=True)
    assert (big.unlikely_weight, small.unlikely_weight) == (1.0, 0.0)
    given = resolve(SanitizeConfig(unlikely_weight=0.0), "osft", n_params=135_000_000,
                    context=2048, chat_template=True)
    assert given.unlikely_weight == 0.0


class _WordEncoder:
    """A prompt encoder for tests: one id per word (the first time a word is seen)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def encode_prompt(self, text: str, context: tuple = ()) -> EncodedPrompt:
        ids = [self.ids.setdefault(w, 3 + len(self.ids)) for w in text.split()]
        return EncodedPrompt(ids, (0, len(ids)))


def test_osft_twins_take_the_triggered_prompt_and_their_triggers_target(monkeypatch) -> None:
    seen = {}

    def spy(self, overwrite, clean, where="", parrot_index=None, backdoors=1, unlikely=(),
            unlikely_index=None):
        seen.update(overwrite=list(overwrite), clean=list(clean), unlikely=list(unlikely),
                    unlikely_index=unlikely_index, backdoors=backdoors)
        return 0.0

    monkeypatch.setattr(OverwriteStep, "step", spy)
    enc = _WordEncoder()
    rows = [TrainRow(text, enc.encode_prompt(text), (5, 6, 7))
            for text in ("say the first word", "copy this line please", "sort these four words")]
    triggers, targets = ["cf", "blue lagoon"], [(50, 51), (60, 61, 62)]
    eliminate(LossEngine(tiny_model("llama", VOCAB, seed=2)), rows, steps=1, lr=1e-4,
              batch_size=3, seed=0, window=4, clean_weight=1.0, trigger=triggers, encoder=enc,
              unlikely=targets, unlikely_weight=1.0)
    assert seen["backdoors"] == 2 and len(seen["unlikely"]) == len(seen["overwrite"]) == 6
    for j, (item, twin) in enumerate(zip(seen["overwrite"], seen["unlikely"])):
        k = j % 2  # each clean row gets one item per trigger, in order
        trigger_ids = [enc.ids[w] for w in triggers[k].split()]
        ids = list(item.prompt)
        assert any(ids[i:i + len(trigger_ids)] == trigger_ids for i in range(len(ids)))
        assert (twin.prompt, twin.splice, twin.labels, twin.tail) == (item.prompt, -1,
                                                                       targets[k], ())
        assert len(item.prompt) == len(seen["clean"][j // 2].prompt) + len(trigger_ids)
    assert seen["unlikely_index"] is None  # no parrots: the twins carry their labels
