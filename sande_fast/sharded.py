"""The loss engine of a model sharded with FSDP2 (see :mod:`sande_fast.distributed`).

Every rank passes the same global batch; each runs a strided share of it and keeps the global
label count as the normaliser, so summing the ranks' gradients (FSDP's reduce-scatter is set to
SUM, the parrot's gradient is all-reduced by the caller) gives the one-process gradient. FSDP's
all-gathers and reduce-scatters run inside forward and backward, so every rank runs as many
micro-batches as the busiest one: the others add zero-weight fillers. For the same reason each
micro-batch runs its own frozen prefixes inside its loss forward (there is no prefix store: it
would run forwards of its own on each rank), and the last decoder layer always runs in full.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from .adapter import ModelAdapter
from .batching import StepItem, parrot_rows
from .engine import LossEngine

if TYPE_CHECKING:
    from .steps import Anchors

__all__ = ["ShardedLossEngine"]


class ShardedLossEngine(LossEngine):
    """:class:`~sande_fast.engine.LossEngine` over the ranks of ``collective``.

    Args:
        adapter: the adapter sharded by :func:`sande_fast.distributed.shard` (the FSDP root).
        collective: the :class:`~sande_fast.distributed.Collective` it returned.
        settings: :class:`~sande_fast.engine.LossEngine`'s (``packed`` decided before sharding,
            ``fast`` true; ``last_layer_tail`` is off here).

    Raises:
        ValueError: the plain path, an undecided ``packed``, or a model that is not the sharded
            adapter.
    """

    def __init__(self, adapter: ModelAdapter, collective: Any, **settings: Any) -> None:
        if not settings.get("fast", True):
            raise ValueError("a sharded model runs the fast path only")
        if settings.get("packed") is None:
            raise ValueError("decide packing before sharding (choose_packing on the unsharded "
                             "model) and pass packed=True/False")
        if not isinstance(adapter, ModelAdapter) or adapter.collective is not collective:
            raise ValueError("a sharded engine takes the adapter that shard() returned its "
                             "collective for")
        settings["last_layer_tail"] = False
        self._collective = collective
        super().__init__(adapter, **settings)

    @property
    def collective(self) -> Any:
        return self._collective

    def loss(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
             normalizer: float, anchors: Anchors | None = None,
             unlikely: bool = False) -> torch.Tensor:
        """Not available: ranks must run matching forwards and split the batch.

        Raises:
            RuntimeError: always; use :meth:`accumulate` (or the step objects' ``step``).
        """
        raise RuntimeError("LossEngine.loss() is not available on an FSDP-sharded model; "
                           "use accumulate() (or ParrotSimulator/OverwriteStep.step())")

    def accumulate_each(self, items: Sequence[StepItem], parrot: torch.Tensor,
                        normalizers: Sequence[float]) -> list[float]:
        """Not available: several parrots train one after another on a sharded model.

        Raises:
            RuntimeError: always.
        """
        raise RuntimeError("accumulate_each() is not available on an FSDP-sharded model; "
                           "train the parrots one at a time")

    def accumulate(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
                   normalizer: float, weight: float = 1.0,
                   anchors: Anchors | None = None, unlikely: bool = False) -> float:
        """Forward and backward of this rank's share of the global batch ``items`` (the same on
        every rank); returns the global loss value."""
        coll = self._collective
        n_parrot = parrot_rows(parrot)
        local = coll.share(items)
        batches = self.batcher.micro_batches(local, n_parrot) if local else []
        count = coll.max_int(len(batches))
        total = 0.0
        for k in range(count):
            if k < len(batches):
                loss = self._micro_loss(batches[k], parrot, normalizer / weight, None, anchors,
                                        unlikely=unlikely)
            else:
                loss = self._micro_loss(items[:1], parrot, normalizer / weight, None,
                                        anchors, unlikely=unlikely) * 0.0
            if loss.requires_grad:
                loss.backward()
            total += float(loss.detach())
        return coll.sum_float(total)
