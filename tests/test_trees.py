"""Token trees: a stage-2 item, its unlikelihood twin and its clean item run as one row, their
shared tokens once; checked against the trie built by brute force and against the plain path."""
from __future__ import annotations

import random

import pytest
import torch

from sande_fast import engine as engine_module
from sande_fast.adapter import ModelAdapter
from sande_fast.batching import StepItem
from sande_fast.engine import LossEngine, Term
from sande_fast.steps import Anchors, OverwriteStep
from sande_fast.trees import build_tree, group_trees, item_tokens, trees_are_exact

from step_helpers import VOCAB, close, grads
from tiny_models import tiny_model

SYSTEM = 18  # tokens every prompt starts with, as a chat template's system block


def _random_seqs(rng: random.Random, n: int) -> list[list]:
    """Sequences over a tiny alphabet with parrot rows, so many share leading tokens."""
    alphabet = [1, 2, 3, (0, 0), (1, 0)]
    return [[rng.choice(alphabet) for _ in range(rng.randrange(1, 7))] for _ in range(n)]


def test_build_tree_is_the_trie_of_its_sequences() -> None:
    rng = random.Random(0)
    for _ in range(50):
        seqs = _random_seqs(rng, rng.randrange(1, 8))
        tree = build_tree(seqs)
        # one node per distinct prefix
        assert len(tree) == len({tuple(s[:j + 1]) for s in seqs for j in range(len(s))})
        for seq, nodes in zip(seqs, tree.nodes):
            assert [tree.tokens[c] for c in nodes] == seq
            assert [tree.depth[c] for c in nodes] == list(range(len(seq)))
            assert [tree.parent[c] for c in nodes] == [-1] + nodes[:-1]
        # depth first: a parent comes before its children, and each subtree is contiguous
        assert all(p < c for c, p in enumerate(tree.parent))
        for c in range(len(tree)):
            below = [d for d in range(len(tree)) if _ancestor(tree.parent, c, d)]
            assert below == list(range(c, c + len(below)))


def _ancestor(parent: list[int], a: int, d: int) -> bool:
    while d >= 0:
        if d == a:
            return True
        d = parent[d]
    return False


def test_group_trees_sizes_are_the_tries_and_respect_the_caps() -> None:
    rng = random.Random(1)
    for _ in range(50):
        seqs = _random_seqs(rng, rng.randrange(1, 12))
        rows, sizes = group_trees(seqs, min_share=2, max_nodes=9)
        assert sorted(i for row in rows for i in row) == list(range(len(seqs)))
        for row, size in zip(rows, sizes):
            assert size == len(build_tree([seqs[i] for i in row]))
            assert len(row) == 1 or size <= 9


def _stage2_items(rng: random.Random, n: int, parrots: int = 2
                  ) -> tuple[list[StepItem], list[StepItem], list[StepItem]]:
    """Overwrite items, their twins (same prompt and splice, then a target) and clean items, as
    stage 2 draws them: prompts with a common system block, a parrot at a random position of
    the user text."""
    system = [rng.randrange(3, VOCAB) for _ in range(SYSTEM)]
    overwrite, twins, clean = [], [], []
    for _ in range(n):
        prompt = tuple(system + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(4, 12))])
        answer = tuple(rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 9)))
        k = rng.randrange(parrots)
        splice = rng.randrange(SYSTEM, len(prompt) + 1)
        overwrite.append(StepItem(prompt, answer, splice, parrot=k))
        twins.append(StepItem(prompt, (7, 8, 9)[:1 + k], splice, parrot=k))
        clean.append(StepItem(prompt, answer))
    return overwrite, twins, clean


def _terms(eng: LossEngine, items: tuple, parrot: torch.Tensor) -> list[Term]:
    overwrite, twins, clean = items
    anchors = Anchors(eng, clean, weight=2.0)
    return [Term(overwrite, parrot, 10.0), Term(twins, parrot, 5.0, weight=0.7, unlikely=True),
            Term(clean, None, 12.0, weight=3.0, anchors=anchors)]


def _run(arch: str, items: tuple, *, fast: bool = True, trees: bool = True,
         min_shared_prefix: int = 16, attn: str | None = None) -> tuple[float, dict, LossEngine]:
    model = tiny_model(arch, VOCAB, seed=3)
    if attn is not None:
        model.config._attn_implementation = attn
    eng = LossEngine(model, fast=fast, trees=trees, min_shared_prefix=min_shared_prefix)
    parrot = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(1))
    terms = _terms(eng, items, parrot)  # anchors from the untrained model, as stage 2 takes them
    value = eng.accumulate_terms(terms)
    return value, grads(model), eng


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("shared", [16, 0])
def test_trees_give_the_plain_paths_loss_and_gradients(arch: str, shared: int) -> None:
    items = _stage2_items(random.Random(2), 7)
    got, g_got, eng = _run(arch, items, min_shared_prefix=shared)
    want, g_want, _ = _run(arch, items, fast=False)
    assert eng._trees_exact is True  # the trees ran
    assert got == pytest.approx(want, rel=1e-5)
    for name in g_want:
        close(g_got[name], g_want[name], rtol=1e-4)


def test_trees_with_an_additive_mask_for_eager_attention() -> None:
    items = _stage2_items(random.Random(3), 5)
    got, g_got, eng = _run("llama", items, attn="eager")
    want, g_want, _ = _run("llama", items, trees=False)
    assert eng._trees_exact is True
    assert got == pytest.approx(want, rel=1e-5)
    for name in g_want:
        close(g_got[name], g_want[name], rtol=1e-4)


def test_trees_run_fewer_tokens_than_separate_rows() -> None:
    overwrite, twins, clean = _stage2_items(random.Random(4), 8)
    eng = LossEngine(tiny_model("llama", VOCAB, seed=3))
    parrot = torch.zeros(2, 3, 32)
    plan = eng._tree_plan([Term(overwrite, parrot, 1.0), Term(twins, parrot, 1.0, unlikely=True),
                           Term(clean, None, 1.0)])
    assert plan is not None
    _, shared, rows, sizes = plan
    assert shared is not None and shared.length == SYSTEM
    items = overwrite + twins + clean
    separate = sum(len(item_tokens(it, 3, SYSTEM)) for it in items)
    # an item, its twin and its clean item as one trie: its distinct prefixes
    own = sum(len({tuple(s[:j + 1]) for s in seqs for j in range(len(s))})
              for seqs in ([item_tokens(it, 3, SYSTEM) for it in triple]
                           for triple in zip(overwrite, twins, clean)))
    # (a clean item sharing a single token with its item keeps a row of its own: min_share 2)
    assert sum(sizes) <= own + len(overwrite) and own < 0.9 * separate
    # every item's row holds its own twin and clean item
    for row in rows:
        assert {i % len(overwrite) for i in row} == {row[0] % len(overwrite)}


def test_trees_fall_back_to_separate_rows_where_the_model_ignores_the_mask(monkeypatch) -> None:
    items = _stage2_items(random.Random(5), 4)
    monkeypatch.setattr(engine_module, "trees_are_exact", lambda adapter: False)
    got, g_got, eng = _run("llama", items)
    assert eng._trees_exact is False
    want, g_want, _ = _run("llama", items, fast=False)
    assert got == pytest.approx(want, rel=1e-5)
    for name in g_want:
        close(g_got[name], g_want[name], rtol=1e-4)


def test_trees_are_exact_on_sdpa_and_eager_attention() -> None:
    for arch in ("llama", "gpt2", "qwen2"):
        assert trees_are_exact(ModelAdapter(tiny_model(arch, VOCAB)))
    model = tiny_model("llama", VOCAB)
    model.config._attn_implementation = "eager"
    assert trees_are_exact(ModelAdapter(model))


def test_no_trees_on_a_frozen_model_or_in_training_mode() -> None:
    overwrite, twins, clean = _stage2_items(random.Random(6), 3)
    model = tiny_model("llama", VOCAB)
    eng = LossEngine(model)
    parrot = torch.zeros(2, 3, 32)
    terms = [Term(overwrite, parrot, 1.0), Term(twins, parrot, 1.0, unlikely=True),
             Term(clean, None, 1.0)]
    assert eng._tree_plan(terms) is not None
    model.train()
    assert eng._tree_plan(terms) is None  # dropout would share masks across rows
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    assert eng._tree_plan(terms) is None  # the frozen-prefix split serves a frozen model


def test_overwrite_step_is_the_same_with_and_without_trees() -> None:
    items = _stage2_items(random.Random(7), 6)
    overwrite, twins, clean = items
    after = []
    for trees in (True, False):
        model = tiny_model("llama", VOCAB, seed=4)
        eng = LossEngine(model, trees=trees)
        parrots = [torch.randn(3, 32, generator=torch.Generator().manual_seed(k))
                   for k in range(2)]
        step = OverwriteStep(eng, lr=1e-2, clean_weight=3.0, parrot=parrots, retain_weight=5.0,
                             anchors=Anchors(eng, clean), unlikely_weight=0.5)
        which = [it.parrot for it in overwrite]
        value = step.step(overwrite, clean, parrot_index=which, backdoors=1, unlikely=twins,
                          unlikely_index=which)
        after.append((value, {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert after[0][0] == pytest.approx(after[1][0], rel=1e-5)
    for name, p in after[1][1].items():
        close(after[0][1][name], p, rtol=1e-4)
