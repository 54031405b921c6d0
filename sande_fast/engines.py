"""Which loss engine a run gets: the one-process :class:`~sande_fast.engine.LossEngine`, or
the sharded :class:`~sande_fast.sharded.ShardedLossEngine` for a model sharded with FSDP2."""
from __future__ import annotations

from typing import Any

from torch import nn

from .engine import LossEngine
from .sharded import ShardedLossEngine

__all__ = ["build_engine"]


def build_engine(model: nn.Module, *, fast: bool = True, token_budget: int = 8192,
                 max_batch: int = 64, packed: bool | None = None, pad_id: int = 0,
                 backend: str = "auto", collective: Any = None, max_waste: float = 0.1,
                 frozen_prefix: bool = True, last_layer_tail: bool = True,
                 min_frozen_prefix: int = 16, trees: bool = True) -> LossEngine:
    """A loss engine for ``model`` (a Hugging Face causal LM or its adapter).

    With ``collective`` (what :func:`sande_fast.distributed.shard` returned for the adapter) the
    engine is the sharded one (:class:`sande_fast.sharded.ShardedLossEngine`): ``model`` must
    then be that adapter, ``fast`` true and ``packed`` decided before sharding
    (:func:`choose_packing` on the unsharded model). The other arguments are
    :class:`LossEngine`'s.

    Raises:
        ValueError: a collective with the plain path, an undecided ``packed``, or a model that
            is not the sharded adapter.
    """
    settings = dict(fast=fast, token_budget=token_budget, max_waste=max_waste,
                    max_batch=max_batch, packed=packed, pad_id=pad_id, backend=backend,
                    frozen_prefix=frozen_prefix, last_layer_tail=last_layer_tail,
                    min_frozen_prefix=min_frozen_prefix)
    if collective is None:
        return LossEngine(model, trees=trees, **settings)
    return ShardedLossEngine(model, collective, **settings)
