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
