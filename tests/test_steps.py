"""The fast stage step against the plain (reference) stage step: same loss, same gradients.

The plain path is the published way: the whole padded sequence with the full response, parrot
spliced with torch.cat, full logits, masked cross-entropy (Hugging Face's own forward). The fast
path truncates, buckets, splices with the kernel and projects only supervised rows.
"""
from __future__ import annotations

import random

import pytest
import torch

from sande_fast.steps import (Anchors, CalibratedSGD, LossEngine, OverwriteStep, ParrotSimulator,
                              StepItem, frozen)

from tiny_models import ARCHS, tiny_model

VOCAB = 97


def _items(rng: random.Random, n: int, parrot: bool, window: int = 4) -> list[StepItem]:
    items = []
    for _ in range(n):
        prompt = tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 17)))
        resp = tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12)))
        splice = rng.randint(0, len(prompt)) if parrot else -1
        items.append(StepItem(prompt, resp[:window], splice, resp[window:]))
    return items


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> None:
    scale = b.abs().max().clamp_min(1e-8)
    assert float((a - b).abs().max() / scale) < rtol


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["packed", "padded", "frozen-prefix", "mixed",
                                  "prefix-inline", "grouped"])
def test_stage1_fast_matches_plain(arch: str, mode: str) -> None:
    # frozen-prefix: prefixes run apart, in no-graph forwards over prefix buckets;
    # mixed: only prefixes of 5+ tokens run apart, shorter ones in ordinary buckets;
    # prefix-inline: each micro-batch runs its own prefixes (as on a sharded model);
    # grouped: frozen-prefix buckets sharing one pass through the LM head.
    model = tiny_model(arch, VOCAB, seed=1)
    items = _items(random.Random(2), 7, parrot=True)
    assert any(it.splice == 0 for it in items) and any(it.splice > 3 for it in items)
    parrot = torch.randn(3, model.config.hidden_size, requires_grad=True)
    results = []
    for fast in (False, True):
        eng = LossEngine(model, fast=fast, packed=mode == "packed",
                         token_budget=4096 if mode == "grouped" else 40,
                         max_batch=3, frozen_prefix=mode not in ("packed", "padded"),
                         min_frozen_prefix=5 if mode == "mixed" else 0)
        if mode == "prefix-inline":
            eng._prefix_store = lambda batches, n: None  # type: ignore[method-assign]
        with frozen(model):
            if fast:  # the mode under test is the one that runs
                split = [eng._splits_prefix(mb, 3) for mb in eng.micro_batches(items, 3)]
                expected = {"packed": {False}, "padded": {False}, "mixed": {False, True}}
                assert set(split) == expected.get(mode, {True})
                groups = eng.head_groups(eng.micro_batches(items, 3), 3)
                if mode == "grouped":
                    assert max(map(len, groups)) > 1
            n = sum(len(it.labels) for it in items)
            val = eng.accumulate(items, parrot, n)
            g = parrot.grad.clone()
        parrot.grad = None
        results.append((val, g))
        assert all(p.grad is None for p in model.parameters())
    (v0, g0), (v1, g1) = results
    assert abs(v0 - v1) <= 1e-5 * abs(v0)
    _close(g1, g0)


def test_frozen_prefix_only_when_no_weight_needs_grad() -> None:
    model = tiny_model("llama", VOCAB, seed=1)
    items = _items(random.Random(0), 4, parrot=True)
    eng = LossEngine(model, packed=False, min_frozen_prefix=0)
    assert not eng._splits_prefix(items, 3)  # stage 2: the prefix rows feed weight gradients
    with frozen(model):
        assert eng._splits_prefix(items, 3)
        assert not eng._splits_prefix(items, 0)
        assert not eng._splits_prefix(items[:1] + [StepItem((5, 6), (7,), -1)], 3)


def test_frozen_prefix_falls_back_within_a_sliding_window() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=8)).float().eval()
    items = _items(random.Random(3), 6, parrot=True)
    parrot = torch.randn(3, 32, requires_grad=True)
    n = sum(len(it.labels) for it in items)
    values = []
    for fast in (False, True):
        eng = LossEngine(model, fast=fast, packed=False, max_batch=3, min_frozen_prefix=0)
        with frozen(model):
            if fast:
                assert not eng._splits_prefix(items, 3)
                assert eng._splits_prefix([StepItem((5, 6), (7,), 1)], 3)
            values.append(eng.accumulate(items, parrot, n))
    assert abs(values[0] - values[1]) <= 1e-5 * abs(values[0])


def _nudge(model: torch.nn.Module, seed: int) -> None:
    """Moves every weight a little, so hidden states leave their anchors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [50, 4096])
@pytest.mark.parametrize("retain", [0.0, 5.0])
def test_stage2_fast_matches_plain(arch: str, budget: int, retain: float) -> None:
    # budget 4096: several padding-capped buckets share one pass through the LM head
    model = tiny_model(arch, VOCAB, seed=2)
    rng = random.Random(1)
    over = _items(rng, 6, parrot=True)
    clean = _items(rng, 7, parrot=False)
    parrot = torch.randn(2, model.config.hidden_size)
    engines = [LossEngine(model, fast=fast, token_budget=budget, max_batch=4, packed=False)
               for fast in (False, True)]
    anchors: list[Anchors | None] = [None, None]
    if retain:
        anchors = [Anchors(e, clean) for e in engines]
        for a in anchors[1].states:  # the stored states agree too
            _close(anchors[1].states[a], anchors[0].states[a])
        _nudge(model, 1)  # so the retention term is not zero
    if budget > 1000:
        assert any(len(g) > 1 for g in engines[1].head_groups(engines[1].micro_batches(over, 2), 2))
    out = []
    for eng, anc in zip(engines, anchors):
        model.zero_grad(set_to_none=True)
        step = OverwriteStep(eng, lr=1e-3, clean_weight=0.7, parrot=parrot,
                             retain_weight=retain, anchors=anc)
        loss = step.loss(over, clean)
        loss.backward()
        out.append((float(loss.detach()), _grads(model)))
    (l0, g0), (l1, g1) = out
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        _close(g1[k], g0[k])


def test_retention_term_matches_brute_force() -> None:
    """Independent reference: the base model's own last hidden states at the label rows."""
    model = tiny_model("llama", VOCAB, seed=7)
    clean = _items(random.Random(5), 5, parrot=False)

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
    _nudge(model, 2)
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
    clean = _items(random.Random(6), 4, parrot=False)
    with pytest.raises(ValueError, match="anchors"):
        OverwriteStep(eng, retain_weight=1.0)
    with pytest.raises(ValueError, match="clean_weight"):
        OverwriteStep(eng, clean_weight=0.0, retain_weight=1.0, anchors=Anchors(eng, clean))
    step = OverwriteStep(eng, retain_weight=1.0, anchors=Anchors(eng, clean[:2]))
    with pytest.raises(KeyError, match="anchor"):
        step.step([], clean)
    with pytest.raises(ValueError, match="parrot"):
        eng.supervised_states(_items(random.Random(7), 2, parrot=True))


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


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_states_stop_in_the_last_layer_with_full_keys_and_values(arch: str) -> None:
    from transformers import DynamicCache

    from sande_fast.adapter import ModelAdapter, cache_argument, cache_tensors

    model = tiny_model(arch, VOCAB, seed=4)
    ad = ModelAdapter(model)
    ids = torch.tensor([[5, 9, 13, 2, 7], [11, 3, 8, 0, 0]])
    full = DynamicCache()
    with torch.no_grad():
        ad.base(inputs_embeds=ad.embed(ids), use_cache=True, **{cache_argument(ad.base): full})
    ref = cache_tensors(full)
    got = ad.prefix_states(ids)
    assert len(got) == len(ref) == model.config.num_hidden_layers
    for (k, v), (rk, rv) in zip(got, ref):
        assert torch.equal(k, rk) and torch.equal(v, rv)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stage", [1, 2])
def test_last_layer_on_supervised_tail_matches_plain(arch: str, stage: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The last decoder layer run only from the first supervised column (keys and values of the
    columns before it from a stopped first pass) gives the plain path's loss and gradients."""
    import sande_fast.steps as steps_mod
    from sande_fast.adapter import ModelAdapter

    monkeypatch.setattr(steps_mod, "_MIN_TAIL_SKIP", 1)  # the test sequences are short
    used = []
    original = ModelAdapter._last_layer_tail

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(self, *args, **kwargs)
        used.append(out is not None)
        return out

    monkeypatch.setattr(ModelAdapter, "_last_layer_tail", spy)
    model = tiny_model(arch, VOCAB, seed=1)
    items = _items(random.Random(2), 7, parrot=True)
    parrot = torch.randn(3, model.config.hidden_size, requires_grad=stage == 1)
    n = sum(len(it.labels) for it in items)
    results = []
    for fast in (False, True):
        model.zero_grad(set_to_none=True)
        parrot.grad = None
        eng = LossEngine(model, fast=fast, packed=False, token_budget=40, max_batch=3)
        with frozen(model) if stage == 1 else torch.enable_grad():
            val = eng.accumulate(items, parrot, n)
        grads = {"parrot": parrot.grad.clone()} if stage == 1 else _grads(model)
        results.append((val, grads))
    assert used and all(used)
    (v0, g0), (v1, g1) = results
    assert abs(v0 - v1) <= 1e-5 * abs(v0)
    assert g0.keys() == g1.keys()
    for name in g0:
        _close(g1[name], g0[name])


def test_last_layer_tail_steps_aside_for_activation_checkpointing() -> None:
    from sande_fast.adapter import ModelAdapter

    model = tiny_model("llama", VOCAB, seed=1)
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    model.train()
    ad = ModelAdapter(model)
    emb = ad.embed(torch.tensor([[5, 6, 7, 8, 9, 10]]))
    assert ad._last_layer_tail(emb, None, None, None, 3) is None
