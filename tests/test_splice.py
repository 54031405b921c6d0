"""The one parrot splice: the same values as slicing with torch.cat and as index assignment."""
from __future__ import annotations

import torch

from sande_fast.splice import splice_parrot


def test_splice_matches_cat_and_index_assignment() -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(3, 9, 5, generator=g)
    parrot = torch.randn(2, 5, generator=g, dtype=torch.float64)
    at = [0, 4, 7]
    got = splice_parrot(emb, parrot, torch.tensor([b * 9 + s for b, s in enumerate(at)]),
                        backend="torch")
    want = emb.clone()
    for b, s in enumerate(at):
        want[b, s:s + 2] = parrot.to(emb.dtype)
        row = torch.cat([emb[b, :s], parrot.to(emb.dtype), emb[b, s + 2:]])
        assert torch.equal(got[b], row)
    assert torch.equal(got, want) and got.dtype == emb.dtype


def test_no_parrot_or_no_splice_returns_the_embeddings() -> None:
    emb = torch.randn(4, 3)
    assert splice_parrot(emb, None, torch.tensor([1])) is emb
    assert splice_parrot(emb, torch.randn(1, 3), None) is emb
    assert splice_parrot(emb, torch.randn(1, 3), torch.zeros(0, dtype=torch.long)) is emb


def test_one_parrot_per_splice_matches_splicing_each_alone() -> None:
    """A stack ``[S, n, H]`` writes parrot ``s`` at splice ``s``: the values and the gradients
    of one splice at a time with the single-parrot path."""
    import pytest

    g = torch.Generator().manual_seed(1)
    emb = torch.randn(3, 9, 5, generator=g, requires_grad=True)
    parrots = torch.randn(3, 2, 5, generator=g, requires_grad=True)
    starts = torch.tensor([b * 9 + s for b, s in enumerate([0, 4, 7])])
    got = splice_parrot(emb, parrots, starts, backend="torch")
    weights = torch.randn(got.shape, generator=g)
    (got * weights).sum().backward()
    got_emb, got_parrots = emb.grad.clone(), parrots.grad.clone()
    emb.grad = parrots.grad = None

    want = emb
    for s in range(3):
        want = splice_parrot(want, parrots[s], starts[s:s + 1], backend="torch")
    (want * weights).sum().backward()
    assert torch.equal(got, want)
    assert torch.equal(got_emb, emb.grad) and torch.equal(got_parrots, parrots.grad)
    assert float(got_emb[0, :2].abs().sum()) == 0.0  # the written rows pass no gradient on
    with pytest.raises(ValueError, match="2 parrots for 3 splices"):
        splice_parrot(emb, parrots[:2], starts)
    with pytest.raises(ValueError, match="overlap"):
        splice_parrot(emb, parrots[:2], torch.tensor([3, 4]))
