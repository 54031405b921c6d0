"""Frozen-prefix reuse across steps (:meth:`LossEngine.reuse_frozen_prefixes`) against the plain
path: the same loss and parrot gradient at every step, on every tiny architecture, and a cache
that never serves a model that trains or whose weights moved."""
from __future__ import annotations

import random

import pytest
import torch

from sande_fast.batching import StepItem
from sande_fast.engine import LossEngine
from sande_fast.stages import TrainRow, simulate
from sande_fast.steps import OverwriteStep, frozen

from step_helpers import VOCAB, close, grads, make_items
from tiny_models import ARCHS, tiny_model


def sliding_model() -> torch.nn.Module:
    """Mistral with a sliding window longer than the test sequences (so prefixes split)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        sliding_window=40)).float().eval()


def model_of(arch: str) -> torch.nn.Module:
    return sliding_model() if arch == "mistral-window" else tiny_model(arch, VOCAB, seed=1)


def draws(rng: random.Random, pool: list[StepItem], steps: int, batch: int) -> list[list[StepItem]]:
    """``steps`` batches of rows from ``pool``, each with a fresh random splice."""
    out = []
    for _ in range(steps):
        rows = [pool[rng.randrange(len(pool))] for _ in range(batch)]
        out.append([StepItem(r.prompt, r.labels, rng.randint(0, len(r.prompt)), r.tail)
                    for r in rows])
    return out


def parrot_step(eng: LossEngine, model: torch.nn.Module, items: list[StepItem],
                parrot: torch.Tensor) -> tuple[float, torch.Tensor]:
    parrot.grad = None
    with frozen(model):
        val = eng.accumulate(items, parrot, sum(len(it.labels) for it in items))
    return val, parrot.grad.clone()


@pytest.mark.parametrize("arch", ARCHS + ("mistral-window",))
@pytest.mark.parametrize("small", [False, True])
def test_reused_prefixes_match_plain_at_every_step(arch: str, small: bool) -> None:
    # small: the keys and values of about 24 tokens, two prompts or so, so entries are evicted
    # and recomputed (and a long prompt is used for its step without being kept)
    model = model_of(arch)
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    per_token = 2 * 2 * kv_heads * (cfg.hidden_size // heads) * 4  # 2 layers, K and V, fp32
    budget = 24 * per_token if small else 1 << 30
    pool = make_items(random.Random(4), 5, parrot=False)
    batches = draws(random.Random(5), pool, 6, 4)
    parrot = torch.randn(3, model.config.hidden_size, requires_grad=True)
    plain = LossEngine(model, fast=False, max_batch=3)
    fast = LossEngine(model, fast=True, packed=False, token_budget=40, max_batch=3,
                      min_frozen_prefix=0, reuse_budget=budget)
    with fast.reuse_frozen_prefixes() as cache:
        assert cache is not None
        for k, items in enumerate(batches):
            with torch.no_grad():
                parrot.add_(0.01)  # a stage-1 step moves the parrot, not the model
            v0, g0 = parrot_step(plain, model, items, parrot)
            v1, g1 = parrot_step(fast, model, items, parrot)
            assert abs(v0 - v1) <= 1e-5 * abs(v0), k
            close(g1, g0)
            assert cache.bytes <= budget
        assert cache.hits > 0  # prompts came back and were served from the cache
        if not small:
            # each prompt ran at most twice (its first prefix, then all of it)
            assert cache.computed <= 2 * len(pool)
    assert fast._reuse is None
    assert all(p.grad is None for p in model.parameters())


def test_reuse_is_off_where_nothing_splits() -> None:
    model = tiny_model("llama", VOCAB, seed=1)
    for eng in (LossEngine(model, fast=False), LossEngine(model, packed=True),
                LossEngine(model, packed=False, frozen_prefix=False),
                LossEngine(model, packed=False, reuse_budget=0)):
        with eng.reuse_frozen_prefixes() as cache:
            assert cache is None


def test_scopes_nest_and_the_cache_ends_with_the_outermost() -> None:
    eng = LossEngine(tiny_model("llama", VOCAB, seed=1), packed=False)
    with eng.reuse_frozen_prefixes() as outer:
        with eng.reuse_frozen_prefixes() as inner:
            assert inner is outer is not None
        assert eng._reuse is outer
    assert eng._reuse is None


def test_no_reuse_once_the_model_trains() -> None:
    """Inside the scope a training step is refused; after it the engine computes its prefixes
    afresh (stage 2 after stage 1 sees the trained weights), matching the plain path."""
    model = tiny_model("llama", VOCAB, seed=3)
    pool = make_items(random.Random(6), 4, parrot=False)
    batches = draws(random.Random(7), pool, 3, 4)
    parrot = torch.randn(3, 32, requires_grad=True)
    fast = LossEngine(model, packed=False, token_budget=40, max_batch=3, min_frozen_prefix=0)
    plain = LossEngine(model, fast=False, max_batch=3)
    step = OverwriteStep(fast, lr=1e-2, parrot=parrot.detach())
    with fast.reuse_frozen_prefixes() as cache:
        parrot_step(fast, model, batches[0], parrot)
        assert len(cache) > 0
        with pytest.raises(RuntimeError, match="reuse_frozen_prefixes"):
            fast.accumulate(batches[1], parrot.detach(), 4.0)  # the model is not frozen here
    assert fast._reuse is None
    step.step(batches[1], [])  # trains the model: the kept keys and values would be stale now
    for items in batches:
        v0, g0 = parrot_step(plain, model, items, parrot)
        v1, g1 = parrot_step(fast, model, items, parrot)
        assert abs(v0 - v1) <= 1e-5 * abs(v0)
        close(g1, g0)


def test_weights_written_in_place_drop_the_cache() -> None:
    model = tiny_model("qwen2", VOCAB, seed=4)
    pool = make_items(random.Random(8), 3, parrot=False)
    batches = draws(random.Random(9), pool, 2, 4)
    parrot = torch.randn(3, 32, requires_grad=True)
    fast = LossEngine(model, packed=False, token_budget=40, max_batch=3, min_frozen_prefix=0)
    plain = LossEngine(model, fast=False, max_batch=3)
    with fast.reuse_frozen_prefixes() as cache:
        parrot_step(fast, model, batches[0], parrot)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.05)
        hits = cache.hits
        v1, g1 = parrot_step(fast, model, batches[0], parrot)
        assert cache.hits == hits  # nothing served from before the write
        v0, g0 = parrot_step(plain, model, batches[0], parrot)
    assert abs(v0 - v1) <= 1e-5 * abs(v0)
    close(g1, g0)


def test_training_mode_reuses_nothing() -> None:
    model = tiny_model("llama", VOCAB, seed=1)
    fast = LossEngine(model, packed=False, min_frozen_prefix=0)
    items = [StepItem((5, 6, 7, 8), (9,), 2)] * 2
    parrot = torch.randn(3, 32, requires_grad=True)
    model.train()
    try:
        with fast.reuse_frozen_prefixes() as cache:
            parrot_step(fast, model, items, parrot)
            parrot_step(fast, model, items, parrot)
            assert len(cache) == 0 and cache.hits == 0
    finally:
        model.eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_simulate_curve_is_the_same_with_and_without_reuse(arch: str) -> None:
    from sande_fast.data import EncodedPrompt

    model = tiny_model(arch, VOCAB, seed=2)
    rng = random.Random(3)
    rows = []
    for _ in range(4):
        ids = (3, 4, 5, 6, 7, 8) + tuple(rng.randrange(9, VOCAB) for _ in range(rng.randint(4, 12)))
        rows.append(TrainRow("x", EncodedPrompt(list(ids), (6, len(ids))), ()))
    out = []
    for budget in (1 << 30, 0):
        eng = LossEngine(model, packed=False, min_frozen_prefix=0, reuse_budget=budget)
        parrot, curve = simulate(eng, rows, (10, 11, 12), steps=8, lr=0.05, n_tokens=2,
                                 batch_size=4, seed=1)
        assert eng._reuse is None
        out.append((parrot, curve))
    (p0, c0), (p1, c1) = out
    assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(c0, c1))
    close(p0, p1)


# -- a prefix shared by the rows of a micro-batch (both stages) -------------------------------------
def system_items(rng: random.Random, n: int, parrot: bool, system: int = 6) -> list[StepItem]:
    """:func:`make_items` behind one shared ``system``-token block (a chat template's), the
    splice inside the text after it."""
    head = tuple(rng.randrange(3, VOCAB) for _ in range(system))
    out = []
    for it in make_items(rng, n, parrot=False):
        splice = rng.randint(system, system + len(it.prompt)) if parrot else -1
        out.append(StepItem(head + it.prompt, it.labels, splice, it.tail))
    return out


@pytest.mark.parametrize("arch", ARCHS + ("mistral-window",))
@pytest.mark.parametrize("retain", [0.0, 5.0])
@pytest.mark.parametrize("call", ["loss", "accumulate"])
def test_stage2_shared_prefix_matches_plain(arch: str, retain: float, call: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The system block run once per call with a graph, expanded to every micro-batch's rows
    (accumulate: its backward once, after the micro-batches'): the same loss and gradients of
    every weight as the plain path (the last-layer tail on too)."""
    import sande_fast.inputs as inputs_mod
    from sande_fast.adapter import ModelAdapter
    from sande_fast.steps import Anchors

    monkeypatch.setattr(inputs_mod, "MIN_TAIL_SKIP", 1)  # the test sequences are short
    shared = []
    original = ModelAdapter.prefix_states

    def spy(self, ids, position_ids=None, graph=False):  # type: ignore[no-untyped-def]
        shared.append(graph)
        return original(self, ids, position_ids, graph)

    monkeypatch.setattr(ModelAdapter, "prefix_states", spy)
    model = model_of(arch)
    rng = random.Random(11)
    over = system_items(rng, 6, parrot=True)
    clean = system_items(rng, 5, parrot=False)
    parrot = torch.randn(2, model.config.hidden_size)
    engines = [LossEngine(model, fast=fast, token_budget=60, max_batch=3, packed=False,
                          min_shared_prefix=4) for fast in (False, True)]
    anchors = [Anchors(e, clean) if retain else None for e in engines]
    out = []
    for eng, anc in zip(engines, anchors):
        model.zero_grad(set_to_none=True)
        step = OverwriteStep(eng, lr=1e-3, clean_weight=0.7, parrot=parrot,
                             retain_weight=retain, anchors=anc)
        if call == "loss":
            loss = step.loss(over, clean)
            loss.backward()
            value = float(loss.detach())
        else:  # what OverwriteStep.step runs, without the optimizer
            value = eng.accumulate(over, parrot, sum(len(i.labels) for i in over))
            value += eng.accumulate(clean, None, sum(len(i.labels) for i in clean),
                                    weight=0.7, anchors=step.anchors)
        out.append((value, grads(model)))
    assert shared == [True, True]  # the fast side ran one shared prefix per call, with a graph
    assert len(engines[1].batcher.micro_batches(over, 2)) > 1
    (l0, g0), (l1, g1) = out
    assert abs(l0 - l1) <= 1e-5 * abs(l0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for k in g0:
        close(g1[k], g0[k])


def test_shared_prefix_graph_is_run_once_and_freed() -> None:
    from sande_fast.engine import SharedPrefix

    model = tiny_model("llama", VOCAB, seed=1)
    eng = LossEngine(model, packed=False, min_shared_prefix=2)
    items = system_items(random.Random(1), 3, parrot=False)
    shared = eng._shared_prefix([items], 0, deferred=True)
    assert isinstance(shared, SharedPrefix) and shared.length == 6 and shared.graph is not None
    assert all(t.is_leaf and t.requires_grad for pair in shared.kv for t in pair)
    with frozen(model):  # nothing to train: no copies, no deferred backward
        assert eng._shared_prefix([items], 0, deferred=True).graph is None


def test_shared_prefix_length_stops_at_splices_labels_and_differences() -> None:
    eng = LossEngine(tiny_model("llama", VOCAB, seed=1), packed=False, min_shared_prefix=2)
    a = StepItem((5, 6, 7, 8, 9), (10,))
    assert eng._shared_prefix_length([a, a], 0) == 4  # the last prompt row predicts a label
    assert eng._shared_prefix_length([a, StepItem((5, 6, 7, 1, 9), (10,))], 0) == 3
    assert eng._shared_prefix_length([a, StepItem((5, 6, 7, 8, 9), (10,), 2)], 2) == 2
    assert eng._shared_prefix_length([a, StepItem((5, 1, 7, 8, 9), (10,))], 0) == 0
    assert eng._shared_prefix_length([a], 0) == 0  # one row: nothing to share
    eng.model.train()
    assert eng._shared_prefix_length([a, a], 0) == 0
    eng.model.eval()
    assert LossEngine(eng.adapter, min_shared_prefix=0, packed=False)._shared_prefix_length(
        [a, a], 0) == 0


def test_a_budget_too_small_to_keep_anything_runs_what_no_reuse_runs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts that cannot be kept run only their prefix, as without reuse: no extra work (a
    little less: a prompt drawn twice in a step runs once, to the longer splice)."""
    model = tiny_model("llama", VOCAB, seed=1)
    pool = make_items(random.Random(12), 4, parrot=False)
    batches = draws(random.Random(13), pool, 5, 4)
    parrot = torch.randn(3, 32, requires_grad=True)
    run: list[int] = []
    original = LossEngine._prefix_forward

    def spy(self, seqs, copy):  # type: ignore[no-untyped-def]
        run.append(sum(len(q) for q in seqs))
        return original(self, seqs, copy)

    monkeypatch.setattr(LossEngine, "_prefix_forward", spy)
    totals = []
    for budget in (0, 1):  # off; on, keeping nothing
        run.clear()
        eng = LossEngine(model, packed=False, token_budget=40, max_batch=3, min_frozen_prefix=0,
                         reuse_budget=budget)
        with eng.reuse_frozen_prefixes() as cache:
            for items in batches:
                parrot_step(eng, model, items, parrot)
            assert (cache is None) == (budget == 0)
        totals.append(sum(run))
    assert 0 < totals[1] <= totals[0]


def test_simulate_stops_once_the_mean_of_the_last_losses_is_below_stop_loss() -> None:
    # The early stop ends the run at the first step whose last-5 mean is below the bound; the
    # parrot is then the one a full run has after that many steps (same seed, same draws).
    from sande_fast.data import EncodedPrompt

    model = tiny_model("llama", VOCAB, seed=2)
    rng = random.Random(4)
    rows = [TrainRow("x", EncodedPrompt(list(ids), (2, len(ids))), ())
            for ids in ([3, 4] + [rng.randrange(9, VOCAB) for _ in range(6)] for _ in range(4))]
    kw = dict(lr=0.2, n_tokens=2, batch_size=4, seed=1)
    _, full = simulate(LossEngine(model, packed=False), rows, (10, 11), steps=40, **kw)
    means = [sum(full[i - 4:i + 1]) / 5 for i in range(4, len(full))]
    bound = sorted(means)[len(means) // 2]  # reached part way through the run
    stop = next(i for i, m in enumerate(means) if m < bound) + 5
    assert 5 <= stop < 40
    parrot, curve = simulate(LossEngine(model, packed=False), rows, (10, 11), steps=40,
                             stop_loss=bound, **kw)
    short, _ = simulate(LossEngine(model, packed=False), rows, (10, 11), steps=stop, **kw)
    assert curve == full[:stop]
    assert torch.equal(parrot, short)
