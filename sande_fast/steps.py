"""Stage steps: the objects a training loop calls, on top of the loss engine.

:class:`ParrotSimulator` (stage 1) learns the parrot on the frozen model; :class:`OverwriteStep`
(stage 2, and OSFT / SFT) trains the model, with the retention term of :class:`Anchors`.
Each takes a batch of :class:`StepItem` and returns its loss, so another training stack can call
them inside its own loop. The losses come from :class:`~sande_fast.engine.LossEngine`
(:func:`~sande_fast.engines.build_engine`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .batching import StepItem, label_count
from .engine import LossEngine, Term

__all__ = ["StepItem", "LossEngine", "ParrotSimulator", "OverwriteStep", "Anchors", "frozen",
           "NonFiniteError", "CalibratedSGD", "MasterWeights", "OPTIMIZERS",
           "make_optimizer"]

# Optimizers of OverwriteStep.
OPTIMIZERS = ("adamw", "sgd")


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the run stops and writes nothing."""


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Sets ``requires_grad=False`` on every parameter for the duration, then restores it."""
    saved = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _check_finite(value: float, params: Sequence[torch.Tensor], where: str,
                  collective: Any = None) -> None:
    # Under FSDP ``value`` is the global loss (the same on every rank) and each rank checks its
    # gradient shards, then the ranks agree, so all of them stop together.
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteError(f"{where}: the loss is not finite ({value}); nothing was written. "
                             "Lower the learning rate or check the data.")
    grads = [_local(p.grad) for p in params if p.grad is not None]
    # One reduction per gradient: the largest |g| is inf or nan exactly when some entry is
    # (amax propagates nan); half the time of isfinite(g).all(), which writes a bool copy.
    finite = not grads or bool(torch.stack([torch.linalg.vector_norm(g, float("inf")).float()
                                            for g in grads]).isfinite().all())
    if collective is not None:
        finite = collective.all_true(finite)
    if not finite:
        raise NonFiniteError(f"{where}: a gradient is not finite; nothing was written. "
                             "Lower the learning rate or check the data.")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


class ParrotSimulator:
    """Stage 1: learns a parrot (soft prompt) that makes the frozen model emit the target.

    Args:
        engine: the loss engine of the model (its parameters are frozen during each step).
        n_tokens: parrot rows.
        lr: Adam learning rate of the parrot.
        seed: initialisation seed; the parrot starts as the embeddings of random vocabulary rows,
            so it starts at the scale the model expects.
        parrot: an existing parrot ``[n_tokens, hidden]`` to continue from instead.
        max_norm: after each step every parrot row is scaled down to at most this multiple of
            the largest token-embedding norm (None: unbounded). A real trigger is made of token
            embeddings; an unbounded soft prompt can push even a clean model anywhere, and
            training the model to ignore such out-of-range inputs costs clean accuracy.

    Example:
        >>> sim = ParrotSimulator(build_engine(model), n_tokens=6, lr=1e-2)
        >>> loss = sim.step(items)           # one optimiser step, returns the loss value
        >>> loss = sim.loss(items)           # or: a graph-bearing loss for your own loop
    """

    def __init__(self, engine: LossEngine, n_tokens: int = 6, lr: float = 1e-2, seed: int = 0,
                 parrot: torch.Tensor | None = None, max_norm: float | None = 1.0) -> None:
        self.engine = engine
        weight = engine.adapter.embed.weight
        if parrot is None:
            g = torch.Generator().manual_seed(seed)
            pick = torch.randint(0, weight.shape[0], (n_tokens,), generator=g)
            parrot = engine.adapter.embedding_rows(pick).float().clone()
        self.parrot = nn.Parameter(parrot.detach().to(weight.device, torch.float32).clone())
        self.optimizer = torch.optim.Adam([self.parrot], lr=lr)
        self.max_row_norm = (None if not max_norm
                             else max_norm * engine.adapter.max_embedding_norm())

    def loss(self, items: Sequence[StepItem]) -> torch.Tensor:
        """Mean cross-entropy of the target tokens; gradients reach only the parrot."""
        with frozen(self.engine.model):
            return self.engine.loss(items, self.parrot, label_count(items))

    def step(self, items: Sequence[StepItem], where: str = "simulate") -> float:
        """One Adam step on the parrot; the model's weights are frozen and untouched."""
        self.optimizer.zero_grad(set_to_none=True)
        coll = self.engine.collective
        with frozen(self.engine.model):
            value = self.engine.accumulate(items, self.parrot, label_count(items))
        if coll is not None:
            # The parrot is replicated, not sharded: sum its gradient over the ranks' shares.
            coll.all_reduce_sum(self.parrot)
        _check_finite(value, [self.parrot], where, coll)
        self.optimizer.step()
        if self.max_row_norm is not None:
            with torch.no_grad():
                self.parrot.copy_(torch.renorm(self.parrot, 2, 0, self.max_row_norm))
        return value

    @staticmethod
    def step_together(sims: Sequence[ParrotSimulator], batches: Sequence[Sequence[StepItem]],
                      where: str = "simulate") -> list[float]:
        """One step of every simulator in ``sims`` (one engine, parrots of one shape) on its own
        batch, the batches run as one pass (:meth:`~sande_fast.engine.LossEngine.accumulate_each`):
        several targets' parrots on one frozen model share the micro-batches and prompt-prefix
        work, while each parrot gets exactly its own batch's gradient and its own Adam step.
        Returns each simulator's loss. A sharded engine runs them one after another."""
        if len(sims) != len(batches):
            raise ValueError(f"{len(sims)} simulators and {len(batches)} batches")
        engine = sims[0].engine if sims else None
        if len(sims) < 2 or engine.collective is not None:
            return [sim.step(batch, where) for sim, batch in zip(sims, batches)]
        if any(sim.engine is not engine for sim in sims):
            raise ValueError("step_together takes simulators of one engine")
        if len({tuple(sim.parrot.shape) for sim in sims}) != 1:
            raise ValueError("step_together takes parrots of one shape")
        for sim in sims:
            sim.optimizer.zero_grad(set_to_none=True)
        items = [replace(it, parrot=k) for k, batch in enumerate(batches) for it in batch]
        stack = torch.stack([sim.parrot for sim in sims])  # gradients flow to each parameter
        with frozen(engine.model):
            values = engine.accumulate_each(items, stack, [label_count(b) for b in batches])
        for sim, value in zip(sims, values):
            _check_finite(value, [sim.parrot], where)
            sim.optimizer.step()
            if sim.max_row_norm is not None:
                with torch.no_grad():
                    sim.parrot.copy_(torch.renorm(sim.parrot, 2, 0, sim.max_row_norm))
        return values


class Anchors:
    """Retention targets: a model's final hidden states at the supervised rows of clean items,
    taken once (before training), and the term that keeps the trained model near them.

    The term of a batch is ``weight * sum ||h - h0||^2 / (scale * normalizer)`` over the
    supervised rows, where ``h0`` is the stored state and ``scale`` the mean ``||h0||^2`` of all
    stored rows, so ``weight`` means the same on any model width. Cross-entropy on clean answers
    only asks that the top token stays on top; this also holds the representation the answer
    is read from, which is what other prompts share.

    Args:
        engine: the loss engine of the model, in the state to retain.
        items: clean items (no parrot) whose supervised rows are kept; items are looked up by
            their prompt and labels.
        weight: weight of the term (see :meth:`with_weight`).
    """

    def __init__(self, engine: LossEngine, items: Sequence[StepItem],
                 weight: float = 1.0) -> None:
        self.weight = float(weight)
        self.states: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
        keys = list(dict.fromkeys(_anchor_key(it) for it in items))
        # supervised_states micro-batches within the engine's token budget.
        states = engine.supervised_states([StepItem(prompt, labels) for prompt, labels in keys])
        total, rows = 0.0, 0
        for key, h in zip(keys, states):
            self.states[key] = h.detach()
            total += float(h.float().pow(2).sum())
            rows += h.shape[0]
        self.scale = total / rows if rows and total > 0 else 1.0

    def __len__(self) -> int:
        return len(self.states)

    def with_weight(self, weight: float) -> "Anchors":
        """The same stored states with another weight (nothing is copied)."""
        out = copy.copy(self)
        out.weight = float(weight)
        return out

    def term(self, hidden: torch.Tensor, items: Sequence[StepItem],
             normalizer: float) -> torch.Tensor:
        """The retention term of ``hidden``, the supervised rows of ``items`` in order."""
        try:
            ref = torch.cat([self.states[_anchor_key(it)] for it in items])
        except KeyError:
            raise KeyError("an item has no retention anchor: build Anchors from every clean "
                           "item the step will see") from None
        diff = hidden.float() - ref.to(hidden.device, torch.float32)
        return diff.pow(2).sum() * (self.weight / (self.scale * normalizer))


def _anchor_key(item: StepItem) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(item.prompt), tuple(item.labels)


class CalibratedSGD(torch.optim.SGD):
    """SGD with momentum whose step size follows the largest gradient seen so far.

    Plain SGD's learning rate depends on the gradients' scale, which differs between models and
    losses. Here ``lr`` is the root-mean-square size, over all parameters, of an update made
    from the largest gradient so far: each step uses the learning rate ``lr / peak``, where
    ``peak`` is the largest gradient RMS up to that step. Steps therefore shrink as the
    gradients do once the objective is met (where AdamW keeps moving every weight by about
    ``lr`` per step), and no step is larger than ``lr`` (before momentum) however small the
    first gradients are.

    Args:
        params: the trained parameters (plain tensors or FSDP2 DTensors).
        lr: RMS size of an update from the peak gradient.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        collective: the engine's cross-rank collective under FSDP (the RMS then covers every
            rank's shards), else None.
    """

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 collective: Any = None) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.target_rms = float(lr)
        self.peak = 0.0
        self._collective = collective

    def _gradient_rms(self) -> float:
        grads = [_local(p.grad) for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        count = sum(g.numel() for g in grads)
        # One host sync for all tensors; the norms accumulate in fp32 without a copy.
        total = (float(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).square()
                                    for g in grads]).sum()) if grads else 0.0)
        if self._collective is not None:
            total = self._collective.sum_float(total)
            count = int(self._collective.sum_float(float(count)))
        return (total / count) ** 0.5 if count else 0.0

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if closure is not None:
            raise ValueError("CalibratedSGD takes no closure")
        self.peak = max(self.peak, self._gradient_rms())
        if self.peak == 0.0:
            return None  # no gradient yet: nothing to move
        for group in self.param_groups:
            group["lr"] = self.target_rms / self.peak
        return super().step()


class MasterWeights:
    """An optimizer that keeps float32 master copies of low-precision (bf16 / fp16) parameters.

    The model computes in its own dtype (bf16 matmuls, half the activation memory of fp32);
    each :meth:`step` hands the gradients to ``optimizer``, built over the fp32 masters (its
    state, e.g. AdamW's moments, is fp32 too), then copies the updated masters back into the
    model, rounded to its dtype. An update smaller than half a bf16 step (about 0.4 % of the
    weight) is therefore accumulated in the master instead of rounding away, and the model the
    run measures and saves is always exactly the rounded weights.

    Why masters rather than an fp32 model cast back on save: the forward and backward passes
    stay in the checkpoint's dtype (the speed and activation memory of bf16, and the asr and
    utility are measured on the weights that are saved), while the extra memory is only the
    4-byte master per trained parameter, the same as an fp32 model's weights.

    Args:
        params: the model's trained parameters (not FSDP DTensors: FSDP keeps its own
            mixed-precision rules, see :func:`sande_fast.distributed.shard`).
        build: makes the inner optimizer from the fp32 master tensors.
    """

    def __init__(self, params: Sequence[torch.Tensor],
                 build: Any) -> None:
        self.params = list(params)
        self.masters = [p.detach().to(torch.float32, copy=True) for p in self.params]
        self.optimizer: torch.optim.Optimizer = build(self.masters)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("MasterWeights takes no closure")
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
            p.grad = None  # the low-precision copy is not needed once its fp32 copy exists
        self.optimizer.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)  # round to nearest into the model's dtype
            m.grad = None

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()


def _needs_masters(params: Sequence[torch.Tensor]) -> bool:
    """Low-precision floating parameters outside FSDP (DTensors keep FSDP's own rules)."""
    return any(p.is_floating_point() and p.dtype in (torch.bfloat16, torch.float16)
               and not hasattr(p, "to_local") for p in params)


def make_optimizer(name: str, params: Sequence[torch.Tensor], lr: float,
                   weight_decay: float = 0.0, collective: Any = None,
                   masters: bool | None = None) -> torch.optim.Optimizer | MasterWeights:
    """The optimizer ``name`` of :data:`OPTIMIZERS` over ``params``.

    Args:
        masters: keep fp32 master weights and optimizer state (:class:`MasterWeights`); default:
            when some parameter is bf16 or fp16 (and not an FSDP shard).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")

    def build(ps: Sequence[torch.Tensor]) -> torch.optim.Optimizer:
        if name == "adamw":
            return torch.optim.AdamW(ps, lr=lr, weight_decay=weight_decay,
                                     fused=_fused_adamw_applies(ps) or None)
        return CalibratedSGD(ps, lr=lr, weight_decay=weight_decay, collective=collective)

    if masters if masters is not None else _needs_masters(params):
        return MasterWeights(params, build)
    return build(params)


def _fused_adamw_applies(params: Sequence[torch.Tensor]) -> bool:
    """Whether AdamW can run its fused kernel: plain (not sharded) floating-point tensors, all
    on one CPU or CUDA device. On the CPU it steps SmolLM2-135M's parameters in a sixth of the
    multi-tensor path's CPU time (``benchmarks/bench_optimizer.py``), with the same update up
    to rounding."""
    from torch.distributed.tensor import DTensor

    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.is_floating_point() and not isinstance(p, DTensor) for p in params))


class OverwriteStep:
    """Stage 2 (and OSFT / SFT): trains the model so triggered or parrot-spliced prompts map to
    the clean response, with a clean-retention term.

    loss = mean CE(overwrite items) + clean_weight * mean CE(clean items)
           + retain_weight * mean over clean supervised rows of ||h - h0||^2 / scale
           + unlikely_weight * mean UL(unlikely items)

    where ``h0`` are the final hidden states stored in ``anchors`` before training
    (:class:`Anchors`) and ``UL = -log(1 - p(label))`` per supervised token: the unlikely items
    are the overwrite items' prompts (same parrot, same splice) followed by the target, whose
    tokens the model should stop giving. Cross-entropy toward the clean answer alone lowers the
    target's first token; a model can then still give the rest of the target once that token
    appears. The unlikelihood term presses on every one of the target's tokens.

    Args:
        engine: the loss engine of the model being trained.
        lr: AdamW learning rate (with ``optimizer="sgd"``: see :class:`CalibratedSGD`).
        clean_weight: weight of the clean-retention term.
        parrot: the frozen parrot spliced into overwrite items (None for OSFT with a real trigger
            and for SFT), or a list of parrots (several backdoors: :meth:`step` is told which
            parrot each overwrite item takes).
        weight_decay: weight decay (decoupled for AdamW, L2 for SGD).
        retain_weight: weight of the hidden-state retention term (0: off).
        anchors: the stored states, covering every clean item passed to :meth:`step`; required
            when ``retain_weight`` is set.
        optimizer: ``adamw``, or ``sgd`` (:class:`CalibratedSGD`: ``lr`` is then the RMS size of
            an update from the largest gradient).
        unlikely_weight: weight of the unlikelihood term on the items passed as ``unlikely`` to
            :meth:`step` (0: off; none may be passed).

    Example:
        >>> anchors = Anchors(engine, clean_items)      # before any training step
        >>> step = OverwriteStep(engine, lr=1e-4, clean_weight=3, parrot=parrot,
        ...                      retain_weight=30, anchors=anchors)
        >>> loss = step.step(overwrite_items, clean_items)
    """

    def __init__(self, engine: LossEngine, lr: float = 1e-4, clean_weight: float = 1.0,
                 parrot: torch.Tensor | None = None, weight_decay: float = 0.0,
                 retain_weight: float = 0.0, anchors: Anchors | None = None,
                 optimizer: str = "adamw", unlikely_weight: float = 0.0) -> None:
        self.engine = engine
        self.clean_weight = clean_weight
        if unlikely_weight < 0:
            raise ValueError(f"unlikely_weight must be at least 0, got {unlikely_weight}")
        self.unlikely_weight = unlikely_weight
        if parrot is None:
            self.parrots: list[torch.Tensor] = []
        elif isinstance(parrot, torch.Tensor):
            self.parrots = [parrot.detach()]
        else:
            self.parrots = [p.detach() for p in parrot]
        self.parrot = self.parrots[0] if self.parrots else None
        self._stack: torch.Tensor | None = None  # the parrots stacked, made on first use
        self.anchors = None
        if retain_weight:
            if anchors is None:
                raise ValueError("retain_weight needs anchors (Anchors(engine, clean_items), "
                                 "built before training)")
            if not clean_weight:
                raise ValueError("retain_weight needs a clean_weight above 0")
            # The clean items' loss is scaled by clean_weight as a whole, retention included.
            self.anchors = anchors.with_weight(retain_weight / clean_weight)
        self.params = [p for p in engine.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(optimizer, self.params, lr, weight_decay,
                                        engine.collective)

    def _by_parrot(self, overwrite: Sequence[StepItem], parrot_index: Sequence[int] | None
                   ) -> list[tuple[list[StepItem], torch.Tensor | None]]:
        """The overwrite items and the parrot they take: one batch plan for all of them, with
        the parrots stacked ``[K, n, H]`` and each item naming its own (``StepItem.parrot``);
        one group per parrot only when their shapes differ."""
        if parrot_index is None:
            return [(list(overwrite), self.parrot)]
        if len(parrot_index) != len(overwrite):
            raise ValueError("parrot_index needs one entry per overwrite item")
        if any(not 0 <= k < len(self.parrots) for k in parrot_index):
            raise ValueError(f"parrot_index must lie in [0, {len(self.parrots)})")
        if len({tuple(p.shape) for p in self.parrots}) == 1:
            if self._stack is None:
                self._stack = torch.stack(self.parrots)
            return [([replace(it, parrot=k) for it, k in zip(overwrite, parrot_index)],
                     self._stack)]
        groups: dict[int, list[StepItem]] = {}
        for item, k in zip(overwrite, parrot_index):
            groups.setdefault(k, []).append(item)
        return [(items, self.parrots[k]) for k, items in sorted(groups.items())]

    def _check_unlikely(self, unlikely: Sequence[StepItem]) -> None:
        if unlikely and not self.unlikely_weight:
            raise ValueError("unlikely items need an unlikely_weight above 0")

    def loss(self, overwrite: Sequence[StepItem], clean: Sequence[StepItem],
             parrot_index: Sequence[int] | None = None,
             backdoors: int = 1, unlikely: Sequence[StepItem] = (),
             unlikely_index: Sequence[int] | None = None) -> torch.Tensor:
        """Graph-bearing loss of one batch (for embedding in another training loop)."""
        self._check_unlikely(unlikely)
        parts = []
        if overwrite:
            # One normaliser over every group: the mean over all overwrite labels, times the
            # backdoors each row carries (each mapping weighs what a lone one would).
            n = label_count(overwrite) / backdoors
            parts += [self.engine.loss(items, parrot, n)
                      for items, parrot in self._by_parrot(overwrite, parrot_index)]
        if unlikely:
            n = label_count(unlikely) / backdoors / self.unlikely_weight
            parts += [self.engine.loss(items, parrot, n, unlikely=True)
                      for items, parrot in self._by_parrot(unlikely, unlikely_index)]
        if clean and self.clean_weight:
            parts.append(self.engine.loss(clean, None, label_count(clean) / self.clean_weight,
                                          self.anchors))
        return torch.stack(parts).sum()

    def step(self, overwrite: Sequence[StepItem], clean: Sequence[StepItem],
             where: str = "overwrite", parrot_index: Sequence[int] | None = None,
             backdoors: int = 1, unlikely: Sequence[StepItem] = (),
             unlikely_index: Sequence[int] | None = None) -> float:
        """One optimizer step on the model; the parrots stay frozen. ``parrot_index[i]``: the
        parrot (an index into the list given at construction) overwrite item ``i`` takes.
        ``backdoors``: overwrite items per clean item (one per backdoor); the overwrite term is
        their sum of means, so each mapping is pushed as hard as a lone one would be; the
        unlikelihood term of ``unlikely`` (parrots named by ``unlikely_index``) likewise."""
        self._check_unlikely(unlikely)
        self.optimizer.zero_grad(set_to_none=True)
        # One call for all terms: the engine runs an item, its twin and its clean item as one
        # token tree where it can (they share the prompt's tokens).
        terms = []
        if overwrite:
            n = label_count(overwrite) / backdoors
            terms += [Term(items, parrot, n) for items, parrot in
                      self._by_parrot(overwrite, parrot_index)]
        if unlikely:
            n = label_count(unlikely) / backdoors
            terms += [Term(items, parrot, n, weight=self.unlikely_weight, unlikely=True)
                      for items, parrot in self._by_parrot(unlikely, unlikely_index)]
        if clean and self.clean_weight:
            terms.append(Term(clean, None, label_count(clean), weight=self.clean_weight,
                              anchors=self.anchors))
        value = self.engine.accumulate_terms(terms)
        _check_finite(value, self.params, where, self.engine.collective)
        self.optimizer.step()
        return value
