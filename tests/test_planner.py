"""Tests of sande_fast.planner against brute-force pure-Python references."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sande_fast.planner import Layout, layout, padding_waste, plan_buckets

# ----------------------------------------------------------------------------------------------
# References: written independently of the C++ code, as literally as the spec reads.


def ref_plan(lengths: list[int], token_budget: int, max_batch: int,
             max_waste: float = 1.0) -> list[list[int]]:
    """Brute-force greedy bucketing: re-checks the whole candidate batch at every step."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # Python sort is stable
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        cand = batch + [i]
        padded = len(cand) * max(lengths[j] for j in cand)
        waste = padded - sum(lengths[j] for j in cand)
        fits = (len(cand) <= max_batch and padded <= token_budget
                and waste <= max_waste * padded)
        if fits or not batch:
            batch = cand
        else:
            batches.append(batch)
            batch = [i]
    if batch:
        batches.append(batch)
    return batches


@dataclass
class RefLayout:
    position_ids: list[int]
    supervised_rows: list[int]
    splice_rows: list[int]


def ref_layout(
    lengths: list[int],
    splice: list[int],
    n_parrot: int,
    sup_start: list[int],
    sup_len: list[int],
    padded_len: int,
) -> RefLayout:
    """Builds the flat view row by row as (sequence, position) tags and reads indices off it."""
    rows: list[tuple[int, int] | None] = []  # None marks a padding row
    for b, L in enumerate(lengths):
        rows.extend((b, t) for t in range(L))
        if padded_len > 0:
            rows.extend([None] * (padded_len - L))
    pos = [0 if r is None else r[1] for r in rows]
    sup = []
    spl = []
    for b in range(len(lengths)):
        for r, tag in enumerate(rows):  # quadratic scan on purpose: no offset arithmetic
            if tag is None or tag[0] != b:
                continue
            if sup_start[b] <= tag[1] < sup_start[b] + sup_len[b]:
                sup.append(r)
            if splice[b] >= 0 and tag[1] == splice[b]:
                spl.append(r)
    return RefLayout(pos, sup, spl)


def assert_layout_equal(got: Layout, ref: RefLayout) -> None:
    for name in ("position_ids", "supervised_rows", "splice_rows"):
        assert getattr(got, name).dtype == np.int64, name
        assert getattr(got, name).ndim == 1, name
    assert got.position_ids.tolist() == ref.position_ids
    assert got.supervised_rows.tolist() == ref.supervised_rows
    assert got.splice_rows.tolist() == ref.splice_rows


def check_plan(lengths: list[int], token_budget: int, max_batch: int,
               max_waste: float = 1.0) -> list[np.ndarray]:
    got = plan_buckets(lengths, token_budget, max_batch, max_waste)
    assert all(b.dtype == np.int64 and b.ndim == 1 for b in got)
    assert [b.tolist() for b in got] == ref_plan(lengths, token_budget, max_batch, max_waste)
    # Invariants, independent of the reference.
    flat = np.concatenate(got) if got else np.zeros(0, dtype=np.int64)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    for b in got:
        assert 1 <= len(b) <= max_batch
        if len(b) > 1:
            padded = len(b) * max(lengths[i] for i in b)
            assert padded <= token_budget
            assert padded - sum(lengths[i] for i in b) <= max_waste * padded
    return got


# ----------------------------------------------------------------------------------------------
# plan_buckets


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), max_size=60),
    token_budget=st.integers(1, 2000),
    max_batch=st.integers(1, 20),
)
def test_plan_matches_reference_hypothesis(
    lengths: list[int], token_budget: int, max_batch: int
) -> None:
    check_plan(lengths, token_budget, max_batch)


@pytest.mark.parametrize("seed", range(20))
def test_plan_matches_reference_seeded(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    # Few distinct values on odd seeds, so stability of ties is exercised.
    hi = 8 if seed % 2 else 250
    lengths = rng.integers(1, hi + 1, size=n).tolist()
    check_plan(lengths, int(rng.integers(1, 4000)), int(rng.integers(1, 64)))


def test_plan_edge_cases() -> None:
    assert plan_buckets([], 100, 4) == []
    assert [b.tolist() for b in check_plan([7], 100, 4)] == [[0]]
    # Longer than the budget: alone, and nothing joins it.
    assert [b.tolist() for b in check_plan([5, 500, 5], 100, 8)] == [[1], [0, 2]]
    assert [b.tolist() for b in check_plan([3, 1, 2], 1000, 1)] == [[0], [2], [1]]
    # All equal: input order kept, chunks of min(max_batch, budget // length).
    assert [b.tolist() for b in check_plan([10] * 7, 30, 8)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert [b.tolist() for b in check_plan([10] * 7, 1000, 2)] == [[0, 1], [2, 3], [4, 5], [6]]
    # Budget exactly met is allowed.
    assert [b.tolist() for b in check_plan([50, 50], 100, 2)] == [[0, 1]]
    # Huge lengths must not overflow the size * max_len test.
    big = 2**62
    assert [b.tolist() for b in check_plan([big, big], 2**63 - 1, 4)] == [[0], [1]]


def test_plan_accepts_numpy_and_is_deterministic() -> None:
    lengths = np.random.default_rng(0).integers(1, 200, size=500).astype(np.int32)
    a = plan_buckets(lengths, 1024, 16)
    b = plan_buckets(lengths.tolist(), 1024, 16)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_plan_beats_random_batching_on_skewed_lengths() -> None:
    rng = np.random.default_rng(1)
    # Skewed: most sequences short, a long tail up to 250 tokens.
    lengths = np.clip(rng.lognormal(3.7, 0.6, size=2000), 20, 250).astype(np.int64)
    batches = plan_buckets(lengths, 2048, 32)
    planned = padding_waste(batches, lengths)
    # Random batching with the very same batch sizes: only the grouping differs.
    perm = rng.permutation(len(lengths))
    sizes = np.cumsum([len(b) for b in batches])[:-1]
    random_waste = padding_waste(np.split(perm, sizes), lengths)
    assert planned < 0.05
    assert planned < random_waste / 4


def test_padding_waste_reference() -> None:
    lengths = [4, 2, 3, 1]
    # batch [0, 1]: 8 rows, 6 used; batch [2, 3]: 6 rows, 4 used -> 4 / 14 padded.
    assert padding_waste([[0, 1], [2, 3]], lengths) == pytest.approx(4 / 14)
    assert padding_waste([[0], [1], [2], [3]], lengths) == 0.0
    assert padding_waste([], lengths) == 0.0
    with pytest.raises(ValueError, match="outside"):
        padding_waste([[0, 4]], lengths)


@pytest.mark.parametrize(
    ("lengths", "budget", "max_batch", "match"),
    [
        ([5, -1], 10, 2, r"lengths\[1\]"),
        ([5, 0], 10, 2, r"lengths\[1\]"),
        ([5], 0, 2, "token_budget"),
        ([5], 10, 0, "max_batch"),
        ([[1, 2]], 10, 2, "1-D"),
        ([1.5, 2.0], 10, 2, "integers"),
        ([5], 10.0, 2, "token_budget"),
    ],
)
def test_plan_bad_input(lengths: object, budget: object, max_batch: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_buckets(lengths, budget, max_batch)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# layout


@st.composite
def batch_specs(draw: st.DrawFn) -> tuple[list[int], list[int], int, list[int], list[int], int]:
    """A valid micro-batch: lengths, splice, n_parrot, sup_start, sup_len, padded_len."""
    n_parrot = draw(st.integers(0, 6))
    B = draw(st.integers(0, 8))
    lengths, splice, sup_start, sup_len = [], [], [], []
    for _ in range(B):
        L = draw(st.integers(1, 40))
        lengths.append(L)
        if n_parrot >= 1 and L >= n_parrot and draw(st.booleans()):
            splice.append(draw(st.integers(0, L - n_parrot)))
        else:
            splice.append(-1)
        s = draw(st.integers(0, L))
        sup_start.append(s)
        sup_len.append(draw(st.integers(0, L - s)))
    if draw(st.booleans()):
        padded_len = 0
    else:
        padded_len = max(lengths, default=1) + draw(st.integers(0, 5))
    return lengths, splice, n_parrot, sup_start, sup_len, padded_len


@settings(max_examples=300, deadline=None)
@given(spec=batch_specs())
def test_layout_matches_reference_hypothesis(spec: tuple) -> None:
    assert_layout_equal(layout(*spec), ref_layout(*spec))


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("packed", [True, False])
def test_layout_matches_reference_seeded(seed: int, packed: bool) -> None:
    rnd = random.Random(seed)
    n_parrot = rnd.randint(1, 8)
    B = rnd.randint(1, 24)
    lengths = [rnd.randint(n_parrot, 250) for _ in range(B)]
    splice = [rnd.randint(0, L - n_parrot) if rnd.random() < 0.5 else -1 for L in lengths]
    sup_start = [rnd.randint(0, L - 1) for L in lengths]
    sup_len = [rnd.randint(0, min(5, L - s)) for L, s in zip(lengths, sup_start)]
    padded_len = 0 if packed else max(lengths)
    args = (np.array(lengths, dtype=np.int32), splice, n_parrot, sup_start, sup_len, padded_len)
    ref = ref_layout(lengths, splice, n_parrot, sup_start, sup_len, padded_len)
    assert_layout_equal(layout(*args), ref)


def test_layout_small_by_hand() -> None:
    got = layout([3, 2], [1, -1], 2, [0, 1], [3, 1], padded_len=4)
    assert got.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 0, 0]
    assert got.supervised_rows.tolist() == [0, 1, 2, 5]
    assert got.splice_rows.tolist() == [1]
    got = layout([3, 2], [1, -1], 2, [0, 1], [3, 1], padded_len=0)
    assert got.position_ids.tolist() == [0, 1, 2, 0, 1]
    assert got.supervised_rows.tolist() == [0, 1, 2, 4]


def test_layout_edge_cases() -> None:
    empty = layout([], [], 0, [], [], 0)
    assert empty.position_ids.size == empty.supervised_rows.size == empty.splice_rows.size == 0
    # One sequence, no parrot anywhere, nothing supervised.
    spec = ([9], [-1], 0, [9], [0], 0)
    assert_layout_equal(layout(*spec), ref_layout(*spec))
    # Parrot filling the whole sequence, all lengths equal, padded_len == length.
    spec = ([4, 4, 4], [0, 0, -1], 4, [0, 2, 3], [4, 2, 1], 4)
    assert_layout_equal(layout(*spec), ref_layout(*spec))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lengths=[3, -2]), r"lengths\[1\]"),
        (dict(splice=[2, -1]), r"splice\[0\].*n_parrot"),  # 2 + 2 > 3
        (dict(splice=[-2, -1]), r"splice\[0\]"),
        (dict(splice=[0, -1], n_parrot=0), "n_parrot"),
        (dict(n_parrot=-1), "n_parrot"),
        (dict(sup_start=[-1, 0]), r"sup_start\[0\]"),
        (dict(sup_len=[1, 3]), r"sup_len\[1\]"),  # 0 + 3 > 2
        (dict(sup_len=[1, -1]), r"sup_len\[1\]"),
        (dict(padded_len=2), r"lengths\[0\].*padded_len"),
        (dict(padded_len=-1), "padded_len"),
        (dict(splice=[0]), "shape"),
        (dict(sup_start=[[0, 0]]), "1-D"),
        (dict(sup_len=[1.0, 1.0]), "integers"),
    ],
)
def test_layout_bad_input(kwargs: dict, match: str) -> None:
    args = dict(
        lengths=[3, 2], splice=[0, -1], n_parrot=2, sup_start=[0, 0], sup_len=[1, 1], padded_len=0
    )
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        layout(**args)  # type: ignore[arg-type]


def test_layout_plan_round_trip() -> None:
    """End to end: every supervised token of every sequence lands on exactly one flat row."""
    rng = np.random.default_rng(3)
    lengths = rng.integers(20, 251, size=300)
    sup_len = rng.integers(1, 6, size=300)
    sup_start = lengths - sup_len  # truncated right after the last supervised token
    for batch in plan_buckets(lengths, 4096, 32):
        pl = int(lengths[batch].max())
        no_parrot = np.full(len(batch), -1)
        lay = layout(lengths[batch], no_parrot, 0, sup_start[batch], sup_len[batch], pl)
        assert lay.position_ids.size == len(batch) * pl <= max(4096, pl)
        # The last supervised row of sequence b is its last real row.
        last = np.arange(len(batch)) * pl + lengths[batch] - 1
        ends = np.cumsum(sup_len[batch]) - 1
        assert lay.supervised_rows[ends].tolist() == last.tolist()


@given(st.lists(st.integers(1, 300), max_size=60), st.integers(1, 5000), st.integers(1, 16),
       st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0]))
@settings(max_examples=200, deadline=None)
def test_plan_waste_cap_matches_reference(lengths: list[int], budget: int, max_batch: int,
                                          waste: float) -> None:
    check_plan(lengths, budget, max_batch, waste)


def test_plan_waste_cap_zero_groups_equal_lengths_only() -> None:
    got = plan_buckets([5, 3, 5, 3, 4], 1000, 8, 0.0)
    assert [sorted(b.tolist()) for b in got] == [[0, 2], [4], [1, 3]]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_plan_waste_cap_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValueError):
        plan_buckets([3, 4], 100, 4, bad)  # type: ignore[arg-type]
