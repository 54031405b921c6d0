"""The fast loss engine against the plain reference path: same loss, same gradients.

The plain path (:mod:`sande_fast.reference`) is the published way: the whole padded sequence
with the full response, full logits, masked cross-entropy (Hugging Face's own forward). The fast
path truncates, buckets, splices with the kernel and projects only supervised rows; every fast
variant (padded, packed, frozen prefix in its three forms, grouped head pass, last-layer tail)
is checked here against it.
"""
from __future__ import annotations

import random

import pytest
import torch

from sande_fast.batching import StepItem
from sande_fast.engine import LossEngine, choose_packing, packing_is_exact
from sande_fast.engines import build_engine
from sande_fast.steps import Anchors, OverwriteStep, frozen

from step_helpers import VOCAB, close, grads, hf_labels_loss, make_items, nudge
from tiny_models import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["packed", "padded", "frozen-prefix", "mixed",
                                  "prefix-inline", "grouped"])
def test_stage1_fast_matches_plain(arch: str, mode: str) -> None:
    # frozen-prefix: prefixes run apart, in no-graph forwards over prefix buckets;
    # mixed: only prefixes of 5+ tokens run apart, shorter ones in ordinary buckets;
    # prefix-inline: each micro-batch runs its own prefixes (as on a sharded model);
    # grouped: frozen-prefix buckets sharing one pass through the LM head.
    model = tiny_model(arch, VOCAB, seed=1)
    items = make_items(random.Random(2), 7, parrot=True)
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
                split = [eng.batcher.splits_prefix(mb, 3) for mb in eng.batcher.micro_batches(items, 3)]
                expected = {"packed": {False}, "padded": {False}, "mixed": {False, True}}
                assert set(split) == expected.get(mode, {True})
                groups = eng.batcher.head_groups(eng.batcher.micro_batches(items, 3), 3)
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
    close(g1, g0)


def test_frozen_prefix_falls_back_within_a_sliding_window() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=8)).float().eval()
    items = make_items(random.Random(3), 6, parrot=True)
    parrot = torch.randn(3, 32, requires_grad=True)
    n = sum(len(it.labels) for it in items)
    values = []
    for fast in (False, True):
        eng = LossEngine(model, fast=fast, packed=False, max_batch=3, min_frozen_prefix=0)
        with frozen(model):
            if fast:
                assert not eng.batcher.splits_prefix(items, 3)
                assert eng.batcher.splits_prefix([StepItem((5, 6), (7,), 1)], 3)
            values.append(eng.accumulate(items, parrot, n))
    assert abs(values[0] - values[1]) <= 1e-5 * abs(values[0])


def test_frozen_prefix_is_off_under_activation_checkpointing() -> None:
    """Checkpointed layers rerun in backward and drop the stopped prefix's cached keys and
    values: the engine must run those rows with the rest, and still match the plain path."""
    model = tiny_model("llama", VOCAB, seed=4)
    items = make_items(random.Random(7), 6, parrot=True)
    parrot = torch.randn(3, model.config.hidden_size, requires_grad=True)
    n = sum(len(it.labels) for it in items)
    with frozen(model):
        want = LossEngine(model, fast=False).accumulate(items, parrot, n)
        want_grad = parrot.grad.clone()
        parrot.grad = None
    # transformers 5 renamed the switch; checkpointing acts only in training mode.
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    try:
        eng = LossEngine(model, fast=True, packed=False, max_batch=3, min_frozen_prefix=0)
        with frozen(model):
            assert not eng.batcher.splits_prefix(items, 3)
            got = eng.accumulate(items, parrot, n)
    finally:
        getattr(model, "activation_checkpointing_disable",
                model.gradient_checkpointing_disable)()
        model.eval()
    assert abs(got - want) <= 1e-5 * abs(want)
    close(parrot.grad, want_grad, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("budget", [50, 4096])
@pytest.mark.parametrize("retain", [0.0, 5.0])
def test_stage2_fast_matches_plain(arch: str, budget: int, retain: float) -> None:
    # budget 4096: several padding-capped buckets share one pass through the LM head
    model = tiny_model(arch, VOCAB, seed=2)
    rng = random.Random(1)
    over = make_items(rng, 6, parrot=True)
    clean = make_items(rng, 7, parrot=False)
    parrot = torch.randn(2, model.config.hidden_size)
    engines = [LossEngine(model, fast=fast, token_budget=budget, max_batch=4, packed=False)
               for fast in (False, True)]
    anchors: list[Anchors | None] = [None, None]
    if retain:
        anchors = [Anchors(e, clean) for e in engines]
        for a in anchors[1].states:  # the stored states agree too
            close(anchors[1].states[a], anchors[0].states[a])
        nudge(model, 1)  # so the retention term is not zero
    if budget > 1000:
        assert any(len(g) > 1 for g in engines[1].batcher.head_groups(engines[1].batcher.micro_batches(over, 2), 2))
    out = []
    for eng, anc in zip(engines, anchors):
        model.zero_grad(set_to_none=True)
        step = OverwriteStep(eng, lr=1e-3, clean_weight=0.7, parrot=parrot,
                             retain_weight=retain, anchors=anc)
        loss = step.loss(over, clean)
        loss.backward()
        out.append((float(loss.detach()), grads(model)))
    (l0, g0), (l1, g1) = out
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        close(g1[k], g0[k])


def test_loss_matches_hf_labels_loss() -> None:
    """Independent reference: Hugging Face's own shifted-label loss on the full sequence."""
    model = tiny_model("llama", VOCAB, seed=5)
    it = StepItem((5, 6, 7, 8), (9, 10, 11), -1, (12, 13))
    got = LossEngine(model, fast=True).loss([it], None, 3)
    torch.testing.assert_close(got, hf_labels_loss(model, it), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_packing_probe_accepts_models_that_keep_sequences_apart(arch: str) -> None:
    model = tiny_model(arch, VOCAB, seed=6)
    assert packing_is_exact(LossEngine(model, packed=False).adapter)


def test_packing_probe_rejects_cross_attention() -> None:
    """A model that ignores position ids (so packed rows see each other) must not be packed."""
    from sande_fast.adapter import ModelAdapter
    model = tiny_model("llama", VOCAB, seed=7)
    ad = ModelAdapter(model)
    real = ad.hidden_states
    ad.hidden_states = lambda emb, position_ids=None, attention_mask=None: real(emb)  # type: ignore[method-assign]
    assert not packing_is_exact(ad)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("stage", [1, 2])
def test_last_layer_on_supervised_tail_matches_plain(arch: str, stage: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The last decoder layer run only from the first supervised column (keys and values of the
    columns before it from a stopped first pass) gives the plain path's loss and gradients."""
    import sande_fast.inputs as inputs_mod
    from sande_fast.adapter import ModelAdapter

    monkeypatch.setattr(inputs_mod, "MIN_TAIL_SKIP", 1)  # the test sequences are short
    used = []
    original = ModelAdapter._last_layer_tail

    def spy(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = original(self, *args, **kwargs)
        used.append(out is not None)
        return out

    monkeypatch.setattr(ModelAdapter, "_last_layer_tail", spy)
    model = tiny_model(arch, VOCAB, seed=1)
    items = make_items(random.Random(2), 7, parrot=True)
    parrot = torch.randn(3, model.config.hidden_size, requires_grad=stage == 1)
    n = sum(len(it.labels) for it in items)
    results = []
    for fast in (False, True):
        model.zero_grad(set_to_none=True)
        parrot.grad = None
        eng = LossEngine(model, fast=fast, packed=False, token_budget=40, max_batch=3)
        with frozen(model) if stage == 1 else torch.enable_grad():
            val = eng.accumulate(items, parrot, n)
        got = {"parrot": parrot.grad.clone()} if stage == 1 else grads(model)
        results.append((val, got))
    assert used and all(used)
    (v0, g0), (v1, g1) = results
    assert abs(v0 - v1) <= 1e-5 * abs(v0)
    assert g0.keys() == g1.keys()
    for name in g0:
        close(g1[name], g0[name])


def test_build_engine_decides_every_setting_at_construction() -> None:
    model = tiny_model("llama", VOCAB, seed=1)
    eng = build_engine(model, token_budget=100, max_batch=5)
    assert type(eng) is LossEngine and eng.collective is None and eng.model is model
    assert eng.packed is False and eng.max_waste == 0.1 and eng.backend == "torch"  # CPU
    assert (eng.batcher.token_budget, eng.batcher.max_batch) == (100, 5)
    assert build_engine(eng.adapter).adapter is eng.adapter  # an adapter is used as it is
    packed = build_engine(model, packed=True)
    assert packed.max_waste == 1.0 and not packed.batcher.frozen_prefix
    assert build_engine(model, fast=False).kernels == "plain"
    # auto: padded buckets off CUDA; for CUDA the probe decides (before sharding)
    assert choose_packing(eng.adapter, None) is False
    assert choose_packing(eng.adapter, False, device=torch.device("cuda")) is False
    assert choose_packing(eng.adapter, None, device=torch.device("cuda")) \
        == packing_is_exact(eng.adapter)


def test_sharded_engine_takes_the_sharded_adapter_and_a_packing_decision() -> None:
    from sande_fast.adapter import ModelAdapter
    from sande_fast.sharded import ShardedLossEngine

    ad = ModelAdapter(tiny_model("llama", VOCAB, seed=1))
    coll = object()
    with pytest.raises(ValueError, match="shard"):  # not the adapter shard() set it on
        build_engine(ad, packed=False, collective=coll)
    ad.collective = coll
    with pytest.raises(ValueError, match="packing"):
        build_engine(ad, collective=coll)
    with pytest.raises(ValueError, match="fast"):
        build_engine(ad, fast=False, packed=False, collective=coll)
    eng = build_engine(ad, packed=False, collective=coll, token_budget=40)
    assert isinstance(eng, ShardedLossEngine) and eng.collective is coll
    assert not eng.last_layer_tail and eng.batcher.token_budget == 40
    with pytest.raises(RuntimeError, match="accumulate"):
        eng.loss([StepItem((5, 6), (7,))], None, 1.0)
