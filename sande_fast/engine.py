"""The loss engine: the loss of a batch of :class:`~sande_fast.batching.StepItem` on one model.

Both paths compute the same number: the summed cross-entropy of the supervised tokens divided by
a normaliser.

* plain (``fast=False``): :mod:`sande_fast.reference`, the published way and the test oracle.
* fast: each sequence is cut after its last supervised token (under causal attention later tokens
  cannot change the loss), sequences are bucketed by length by the C++ planner
  (:mod:`sande_fast.batching`), the parrot is written into the input embeddings by one kernel,
  and only the supervised rows' hidden states go through the fused linear cross-entropy, so no
  logits tensor ever exists (:class:`~sande_fast.adapter.ModelAdapter`). When no model weight
  needs a gradient (stage 1, the probe), the prompt tokens before the parrot cannot depend on
  anything trained: they run once without a graph and enter as cached keys and values, so the
  backward pass covers only the parrot and what follows it. In the last decoder layer only the
  columns from the first supervised row on run attention and MLP; the columns before them only
  need that layer's keys and values. Inside :meth:`LossEngine.reuse_frozen_prefixes` (a whole
  stage-1 run, a probe) those keys and values are also kept across steps
  (:class:`FrozenPrefixCache`): the splice moves every step, but the prompt before it does not
  change while the model is frozen, so a row's prompt runs at most about twice per run. A
  prompt prefix every sequence of a call shares (a chat template's system block) runs once for
  all its micro-batches, with a graph when the model trains (:class:`SharedPrefix`). A stage-2
  step's terms go through :meth:`LossEngine.accumulate_terms` together: an overwrite item, its
  unlikelihood twin and its clean item start with the same tokens, and run as one token tree
  row (:mod:`sande_fast.trees`), each shared token once.

:func:`sande_fast.engines.build_engine` makes an engine; with a ``collective`` (a model sharded
by :func:`sande_fast.distributed.shard`) it is the sharded variant of :mod:`sande_fast.sharded`.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from torch import nn

from . import reference
from .adapter import FastLoss, HeadLoss, ModelAdapter, Prefix, SupervisedHidden
from .batching import Batcher, StepItem, fast_length, parrot_rows, right_padded
from .inputs import KV, PrefixStore, Rows, prefixed_rows, shared_prefix_rows, token_rows
from .kernels import kernel_backend
from .trees import group_trees, item_tokens, mask_dtype_for, tree_rows, trees_are_exact

if TYPE_CHECKING:
    from .steps import Anchors

__all__ = ["LossEngine", "FrozenPrefixCache", "SharedPrefix", "Term", "packing_is_exact",
           "choose_packing", "DEFAULT_REUSE_BUDGET"]

# Bytes of prompt keys and values a frozen-prefix reuse scope keeps by default: a few hundred
# rows of a 1B model's prompts, a few dozen of a 7B model's; the least recently used go first.
DEFAULT_REUSE_BUDGET = 1 << 30


class FrozenPrefixCache:
    """Keys and values of prompts on a frozen model, kept across steps (least recently used
    evicted first, within ``budget`` bytes).

    An entry is a prompt's per-layer keys and values ``[1, kv_heads, n, head_dim]`` of its first
    ``n`` tokens; under causal attention the prefix before any splice ``s <= n`` is their first
    ``s`` columns. A prompt not kept runs only its current prefix (what a step without the
    cache would run: rows a run draws once, or that were evicted, cost nothing extra); one kept
    shorter than a later splice runs in full, so every later splice is a slice.

    Args:
        budget: bytes of keys and values kept; an entry larger than this is used for its step
            and not kept.
    """

    def __init__(self, budget: int) -> None:
        self.budget = int(budget)
        self.entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self.bytes = 0
        self.version: tuple[int, ...] | None = None
        # Counters for tests and benchmarks: prompt forwards run and prefixes served from cache.
        self.computed = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self.entries)

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def get(self, prompt: tuple[int, ...]) -> KV | None:
        kv = self.entries.get(prompt)
        if kv is not None:
            self.entries.move_to_end(prompt)
        return kv

    def put(self, prompt: tuple[int, ...], kv: KV) -> None:
        old = self.entries.pop(prompt, None)
        if old is not None:
            self.bytes -= _kv_bytes(old)
        size = _kv_bytes(kv)
        if size > self.budget:
            return
        self.entries[prompt] = kv
        self.bytes += size
        while self.bytes > self.budget:
            _, dropped = self.entries.popitem(last=False)
            self.bytes -= _kv_bytes(dropped)


def _kv_bytes(kv: KV) -> int:
    return sum(t.numel() * t.element_size() for pair in kv for t in pair)


def _kv_length(kv: KV) -> int:
    return kv[0][0].shape[2]


@dataclass(frozen=True)
class Term:
    """One term of a step's loss, as :meth:`LossEngine.accumulate` takes it:
    ``weight * (summed loss of items' supervised tokens [+ retention of anchors]) /
    normalizer``, cross-entropy or (``unlikely``) unlikelihood."""

    items: Sequence[StepItem]
    parrot: torch.Tensor | None
    normalizer: float
    weight: float = 1.0
    anchors: Anchors | None = None
    unlikely: bool = False


class SharedPrefix:
    """Keys and values ``[1, kv_heads, P, head_dim]`` of a prompt prefix every sequence of a
    call shares (a chat template's system block), computed once for all its micro-batches.

    Args:
        kv: what the rows attend to (expanded to each micro-batch's rows).
        graph: when ``kv`` are detached copies: the originals, carrying the prefix's graph;
            :meth:`backward` then runs it once with the copies' accumulated gradients, which
            is exact because the gradient is linear in the rows' contributions.
    """

    def __init__(self, kv: KV, graph: KV | None = None) -> None:
        self.kv = kv
        self.graph = graph

    @property
    def length(self) -> int:
        return _kv_length(self.kv)

    def backward(self) -> None:
        """The prefix's own backward from what the micro-batches left in the copies' ``grad``."""
        if self.graph is None:
            return
        outs, grads = [], []
        for pair, leaf in zip(self.graph, self.kv):
            for t, c in zip(pair, leaf):
                if c.grad is not None:
                    outs.append(t)
                    grads.append(c.grad)
        if outs:
            torch.autograd.backward(outs, grads)
        self.graph = None  # its buffers are freed; a second call would fail


class LossEngine:
    """Computes the loss of a list of :class:`StepItem` on one model, in one process.

    Every setting is decided here, once; build a sharded engine with :func:`sande_fast.engines.build_engine`.

    Args:
        model: a Hugging Face causal LM, or its :class:`~sande_fast.adapter.ModelAdapter`.
        fast: the fast path (truncation, planner buckets, splice kernel, fused loss) or the plain
            reference path.
        token_budget: fast path: at most this many (padded) tokens per micro-batch.
        max_waste: fast path: at most this share of a micro-batch's rows are padding (a
            shorter sequence starts a new bucket instead); 1 when packed.
        max_batch: at most this many sequences per micro-batch (both paths).
        packed: fast path: pack a micro-batch into one row without padding (position ids restart
            per sequence; flash-attn's varlen kernel or PyTorch's attention with a block mask).
            None (auto): see :func:`choose_packing`.
        pad_id: id written into padding and parrot placeholder rows.
        backend: kernel backend, ``auto`` (from the model's device), ``triton`` or ``torch``.
        frozen_prefix: fast path, padded buckets: when no model weight needs a gradient (stage
            1, the probe), the tokens before the parrot run once without a graph and only the
            parrot and what follows it are in the backward pass (the prefix enters as cached
            keys and values). Exact; off gives one graph over the whole sequence.
        last_layer_tail: fast path, padded buckets, one process, SDPA attention: the last
            decoder layer runs its attention output and MLP only for the columns from the first
            supervised row on (the others only need that layer's keys and values). Exact.
        min_frozen_prefix: only prefixes of at least this many tokens run apart; shorter ones
            save too little backward work to be worth a separate forward and stay in ordinary
            buckets. The prefixes of a step run together, in length buckets of their own.
        reuse_budget: bytes of prompt keys and values :meth:`reuse_frozen_prefixes` keeps
            across steps (0: none kept, every step runs its prefixes).
        min_shared_prefix: fast path, padded buckets, one process, eval mode: when every
            sequence of a call (:meth:`loss`, :meth:`accumulate`) starts with the same at least
            this many prompt tokens (a chat template's system block) before any splice, they
            run once for all its micro-batches, with a graph when the model trains, and the
            rows attend to their keys and values. Exact. 0: off.
        trees: fast path, padded buckets, one process: :meth:`accumulate_terms` runs the terms'
            sequences that start alike (a stage-2 item, its unlikelihood twin and its clean
            item) as token trees (:mod:`sande_fast.trees`), their shared tokens once. Exact;
            used only where the model honours the trees' mask (checked once).
    """

    def __init__(self, model: nn.Module, *, fast: bool = True, token_budget: int = 8192,
                 max_waste: float = 0.1, max_batch: int = 64, packed: bool | None = None,
                 pad_id: int = 0, backend: str = "auto", frozen_prefix: bool = True,
                 last_layer_tail: bool = True, min_frozen_prefix: int = 16,
                 reuse_budget: int = DEFAULT_REUSE_BUDGET, min_shared_prefix: int = 16,
                 trees: bool = True) -> None:
        self.adapter = model if isinstance(model, ModelAdapter) else ModelAdapter(model)
        self.fast = fast
        self.pad_id = pad_id
        self.backend = kernel_backend(self.adapter.device) if backend == "auto" else backend
        self.packed = choose_packing(self.adapter, packed, fast=fast)
        # One packed row per micro-batch has no padding to cap.
        self.max_waste = 1.0 if self.packed else max_waste
        self.token_budget = token_budget
        self.max_batch = max_batch
        self.frozen_prefix = frozen_prefix
        self.last_layer_tail = last_layer_tail
        self.min_frozen_prefix = min_frozen_prefix
        window = getattr(getattr(self.model, "config", None), "sliding_window", None)
        self.batcher = Batcher(fast=fast, token_budget=token_budget, max_batch=max_batch,
                               max_waste=self.max_waste,
                               frozen_prefix=frozen_prefix and not self.packed,
                               min_frozen_prefix=min_frozen_prefix, sliding_window=window,
                               model_frozen=self._prefix_may_stop)
        self.reuse_budget = reuse_budget
        self.min_shared_prefix = min_shared_prefix
        self._reuse: FrozenPrefixCache | None = None
        self._reuse_depth = 0
        self.trees = trees
        # Trees run when their rows hold at most this share of the separate rows' tokens
        # (a custom mask costs SDPA its fused causal kernel, so a small saving is not worth it).
        self.tree_max_share = 0.95
        self._trees_exact: bool | None = None  # checked on first use

    @property
    def model(self) -> nn.Module:
        """The Hugging Face model."""
        return self.adapter.model

    @property
    def collective(self) -> Any:
        """The cross-rank collective of a sharded engine; None in one process."""
        return None

    @property
    def kernels(self) -> str:
        """Which kernels run the loss: ``triton``, ``torch`` (chunked) or ``plain``."""
        return self.backend if self.fast else "plain"

    def _model_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.model.parameters())

    def _prefix_may_stop(self) -> bool:
        """Whether the rows before the parrot may run apart without a graph: the model is
        frozen, and no activation checkpointing would rerun the layers in backward (the
        checkpointed layers drop the cached prefix keys and values and fail on the shapes)."""
        return self._model_frozen() and not self.adapter.checkpointing

    # -- frozen-prefix reuse ---------------------------------------------------------------------
    @contextlib.contextmanager
    def reuse_frozen_prefixes(self) -> Iterator[FrozenPrefixCache | None]:
        """Keeps the keys and values of frozen prompt prefixes across the steps run inside.

        For a stage-1 run or a probe: the model is frozen at every step (the steps freeze it)
        and unchanged between them, so the prompt before each splice has the same keys and
        values at every step. The cache lives only inside this scope (nested scopes share the
        outermost one's) and is dropped on leaving it, so it never outlives the frozen phase. A
        step that would train the model inside the scope is refused, and the cache is also
        dropped when any parameter is written in place (its version counter moves). In training
        mode nothing is reused (dropout draws new masks each step). Exact up to float rounding:
        a prefix's keys and values come from a forward of a longer row.

        Yields:
            The cache (for inspection), or None when nothing can be reused (the plain path,
            packed rows, no frozen prefix, a zero ``reuse_budget``).
        """
        usable = self.fast and self.batcher.frozen_prefix and self.reuse_budget > 0
        outer = self._reuse_depth == 0
        if outer and usable:
            self._reuse = FrozenPrefixCache(self.reuse_budget)
        self._reuse_depth += 1
        try:
            yield self._reuse
        finally:
            self._reuse_depth -= 1
            if self._reuse_depth == 0:
                self._reuse = None

    def _check_reuse(self) -> None:
        """Inside a reuse scope: refuses a step on a model that trains."""
        if self._reuse_depth and not self._model_frozen():
            raise RuntimeError("a model weight needs a gradient inside reuse_frozen_prefixes(): "
                               "the kept prompt keys and values would go stale; train outside "
                               "the scope")

    def _weights_version(self) -> tuple[int, ...]:
        # In-place writes (an optimizer step, load_state_dict, copy_ under no_grad) bump a
        # parameter's version counter; requires_grad_ and reads do not.
        return tuple(p._version for p in self.model.parameters())

    # -- losses ---------------------------------------------------------------------------------
    def loss(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
             normalizer: float, anchors: Anchors | None = None,
             unlikely: bool = False) -> torch.Tensor:
        """Sum of the supervised tokens' cross-entropy over ``items``, divided by ``normalizer``.

        One graph over all items (for callers that run their own backward); use
        :meth:`accumulate` to bound memory by micro-batching. With ``anchors`` (see
        :class:`~sande_fast.steps.Anchors`), the retention term of each item's supervised rows
        is added. With ``unlikely``, each supervised token's unlikelihood ``-log(1 - p)``
        replaces its cross-entropy (the labels are what the model must stop saying).
        """
        self._check_reuse()
        _check_kind(anchors, unlikely)
        n_parrot = parrot_rows(parrot)
        batches = self.batcher.micro_batches(items, n_parrot)
        store = self._prefix_store(batches, n_parrot)
        # One graph over everything: the shared prefix's graph goes straight into it.
        shared = self._shared_prefix(batches, n_parrot, deferred=False)
        parts = [self._group_loss(g, parrot, normalizer, store, anchors, shared, unlikely)
                 for g in self.batcher.head_groups(batches, n_parrot)]
        return torch.stack(parts).sum()

    def accumulate(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
                   normalizer: float, weight: float = 1.0,
                   anchors: Anchors | None = None, unlikely: bool = False) -> float:
        """Forward and backward per micro-batch, gradients accumulating; returns the loss value.

        ``weight`` scales the whole loss, the retention term of ``anchors`` included;
        ``unlikely`` as in :meth:`loss`.
        """
        self._check_reuse()
        _check_kind(anchors, unlikely)
        n_parrot = parrot_rows(parrot)
        batches = self.batcher.micro_batches(items, n_parrot)
        store = self._prefix_store(batches, n_parrot)
        shared = self._shared_prefix(batches, n_parrot, deferred=True)
        total = 0.0
        for group in self.batcher.head_groups(batches, n_parrot):
            total += _backward(self._group_loss(group, parrot, normalizer / weight, store,
                                                anchors, shared, unlikely))
        if shared is not None:
            shared.backward()
        return total

    def accumulate_terms(self, terms: Sequence[Term]) -> float:
        """:meth:`accumulate` of every term, gradients summing; returns the summed value.

        Where the fast path can (see :meth:`_tree_plan`), the terms' sequences that start
        alike run as token trees: one row per group, every shared token once, each sequence
        seeing exactly its own tokens, and the supervised rows of each term going through the
        LM head with that term's loss. Otherwise the terms run one after another.
        """
        self._check_reuse()
        terms = [t for t in terms if t.items]
        for t in terms:
            _check_kind(t.anchors, t.unlikely)
        plan = self._tree_plan(terms)
        if plan is None:
            return sum(self.accumulate(t.items, t.parrot, t.normalizer, t.weight, t.anchors,
                                       t.unlikely) for t in terms)
        parrot, shared, rows, sizes = plan
        pairs = [(k, it) for k, t in enumerate(terms) for it in t.items]
        mask_dtype = mask_dtype_for(self.model)
        total = 0.0
        for group in self._tree_groups(sizes):
            hidden: list[list[torch.Tensor]] = [[] for _ in terms]
            labels: list[list[torch.Tensor]] = [[] for _ in terms]
            items: list[list[StepItem]] = [[] for _ in terms]
            for mb in group:
                inputs = tree_rows([[pairs[i] for i in rows[r]] for r in mb], len(terms),
                                   parrot, prefix_kv=shared.kv if shared else None,
                                   pad_id=self.pad_id, device=self.adapter.device,
                                   mask_dtype=mask_dtype, last_layer_tail=self.last_layer_tail)
                h = self.adapter(SupervisedHidden(inputs, self.backend))
                for k, (hk, yk) in enumerate(zip(h.split(inputs.sections),
                                                 inputs.labels.split(inputs.sections))):
                    hidden[k].append(hk)
                    labels[k].append(yk)
                    items[k] += inputs.term_items[k]
            parts = []
            for k, t in enumerate(terms):
                if not items[k]:
                    continue
                hk, norm = torch.cat(hidden[k]), t.normalizer / t.weight
                loss = self.adapter(HeadLoss(hk, torch.cat(labels[k]), norm, self.backend,
                                             unlikely=t.unlikely))
                if t.anchors is not None:
                    loss = loss + t.anchors.term(hk, items[k], norm)
                parts.append(loss)
            total += _backward(torch.stack(parts).sum())
        if shared is not None:
            shared.backward()
        return total

    def _tree_plan(self, terms: Sequence[Term]) -> tuple[torch.Tensor | None,
                                                         SharedPrefix | None,
                                                         list[list[int]],
                                                         list[int]] | None:
        """How :meth:`accumulate_terms` runs ``terms`` as token trees: the parrot they share,
        the shared prompt prefix, the rows (indices into the terms' items, term after term)
        and each row's nodes; None where trees do not apply or would run more than
        ``tree_max_share`` of the separate rows' tokens."""
        if not (self.trees and self.fast and not self.packed and self.collective is None
                and len(terms) > 1 and not self._model_frozen() and not self.model.training):
            # Dropout (training mode) would draw one mask for tokens that separate rows draw
            # apart; a frozen model has the frozen-prefix split instead.
            return None
        parrots = [t.parrot for t in terms if t.parrot is not None]
        if any(p is not parrots[0] for p in parrots):
            return None
        parrot = parrots[0] if parrots else None
        n_parrot = parrot_rows(parrot)
        items = [it for t in terms for it in t.items]
        window = self.batcher.sliding_window
        if isinstance(window, int) and window > 0 and \
                max(fast_length(it, n_parrot) for it in items) >= window:
            return None  # a custom mask replaces the model's sliding-window mask
        if self._trees_exact is None:
            self._trees_exact = trees_are_exact(self.adapter)
        if not self._trees_exact:
            return None
        skip = self._shared_prefix_length(items, n_parrot)
        seqs = [item_tokens(it, n_parrot, skip) for it in items]
        rows, sizes = group_trees(seqs, min_share=2,
                                  max_nodes=max(self.token_budget // 4, 64))
        if sum(sizes) > self.tree_max_share * sum(len(s) for s in seqs):
            return None
        shared = self._prefix_kv(items[0].prompt[:skip], deferred=True) if skip else None
        return parrot, shared, rows, sizes

    def _tree_groups(self, sizes: Sequence[int]) -> list[list[list[int]]]:
        """Tree rows (by index) in length buckets (micro-batches); consecutive buckets whose
        padded tokens fit the token budget share one pass through the LM head."""
        groups: list[list[list[int]]] = []
        used = 0
        for bucket in self.batcher.buckets(sizes):
            mb = [int(r) for r in bucket]
            cost = len(mb) * max(sizes[r] for r in mb)
            if not groups or used + cost > self.token_budget:
                groups.append([])
                used = 0
            groups[-1].append(mb)
            used += cost
        return groups

    def accumulate_each(self, items: Sequence[StepItem], parrot: torch.Tensor,
                        normalizers: Sequence[float]) -> list[float]:
        """:meth:`accumulate` for several parrots trained together (stage 1 or probes of several
        targets on one frozen model): ``parrot`` is a stack ``[K, n, H]``, item ``i`` takes
        parrot ``items[i].parrot`` and belongs to its group, and the loss is the sum over the
        groups of the group's summed cross-entropy divided by ``normalizers[k]``. Each parrot
        gets the gradient its group alone would give it; returns every group's loss value (0
        for a group without items).

        The groups' sequences share the micro-batches (and the prompt-prefix work); only the
        pass through the LM head runs once per group, so each group's value is its own.
        """
        self._check_reuse()
        if parrot.dim() != 3 or len(normalizers) != parrot.shape[0]:
            raise ValueError(f"accumulate_each takes a parrot stack [K, n, H] and K normalizers, "
                             f"got {tuple(parrot.shape)} and {len(normalizers)}")
        n_parrot = parrot_rows(parrot)
        batches = self.batcher.micro_batches(items, n_parrot)
        store = self._prefix_store(batches, n_parrot)
        shared = self._shared_prefix(batches, n_parrot, deferred=True)
        values = [0.0] * len(normalizers)
        for group in self.batcher.head_groups(batches, n_parrot):
            losses = self._group_losses(group, parrot, normalizers, store, shared)
            total = torch.stack([loss for loss in losses.values()]).sum()
            if total.requires_grad:
                total.backward()
            for k, loss in losses.items():
                values[k] += float(loss.detach())
        if shared is not None:
            shared.backward()
        return values

    def _group_losses(self, group: Sequence[Sequence[StepItem]], parrot: torch.Tensor,
                      normalizers: Sequence[float], store: PrefixStore | None,
                      shared: SharedPrefix | None) -> dict[int, torch.Tensor]:
        """Per parrot index, the summed cross-entropy of its items' supervised rows in
        ``group`` divided by its normalizer."""
        items = [it for mb in group for it in mb]
        owners = sorted({it.parrot for it in items})
        if not self.fast:
            return {k: torch.stack([reference.plain_loss(
                        self.adapter, [it for it in mb if it.parrot == k], parrot,
                        normalizers[k], self.pad_id)
                        for mb in group if any(it.parrot == k for it in mb)]).sum()
                    for k in owners}
        hidden, labels = [], []
        for mb in group:
            inputs = self.inputs(mb, parrot, store, shared)
            hidden.append(self.adapter(SupervisedHidden(inputs, self.backend)))
            labels.append(inputs.labels)
        h, y = torch.cat(hidden), torch.cat(labels)
        # The supervised rows come item by item, in order: each row's group is its item's.
        owner = torch.tensor([it.parrot for it in items for _ in it.labels], device=h.device)
        out = {}
        for k in owners:
            rows = (owner == k).nonzero().squeeze(1)
            out[k] = self.adapter(HeadLoss(h.index_select(0, rows), y.index_select(0, rows),
                                           normalizers[k], self.backend))
        return out

    def _micro_loss(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
                    normalizer: float, store: PrefixStore | None = None,
                    anchors: Anchors | None = None,
                    shared: SharedPrefix | None = None,
                    unlikely: bool = False) -> torch.Tensor:
        if not self.fast and unlikely:
            hidden = reference.plain_hidden(self.adapter, items, parrot, self.pad_id)
            labels = torch.tensor([t for it in items for t in it.labels], device=hidden.device)
            return self.adapter(HeadLoss(hidden, labels, normalizer, self.backend,
                                         unlikely=True))
        if not self.fast:
            loss = reference.plain_loss(self.adapter, items, parrot, normalizer, self.pad_id)
            if anchors is not None:
                hidden = reference.plain_hidden(self.adapter, items, parrot, self.pad_id)
                loss = loss + anchors.term(hidden, items, normalizer)
            return loss
        inputs = self.inputs(items, parrot, store, shared)
        if anchors is None and not unlikely:
            return self.adapter(FastLoss(inputs, normalizer, self.backend))
        hidden = self.adapter(SupervisedHidden(inputs, self.backend))
        loss = self.adapter(HeadLoss(hidden, inputs.labels, normalizer, self.backend,
                                     unlikely=unlikely))
        return loss if anchors is None else loss + anchors.term(hidden, items, normalizer)

    def _group_loss(self, group: Sequence[Sequence[StepItem]], parrot: torch.Tensor | None,
                    normalizer: float, store: PrefixStore | None,
                    anchors: Anchors | None = None,
                    shared: SharedPrefix | None = None,
                    unlikely: bool = False) -> torch.Tensor:
        """The loss of several micro-batches with one pass through the LM head: each bucket
        runs the model on its own (no padding across buckets), then their supervised rows go
        through the fused cross-entropy (or the unlikelihood) together, so the head weight is
        read once."""
        if len(group) == 1 or not self.fast:
            return torch.stack([self._micro_loss(mb, parrot, normalizer, store, anchors, shared,
                                                 unlikely)
                                for mb in group]).sum()
        hidden, labels = [], []
        for mb in group:
            inputs = self.inputs(mb, parrot, store, shared)
            hidden.append(self.adapter(SupervisedHidden(inputs, self.backend)))
            labels.append(inputs.labels)
        h = torch.cat(hidden)
        loss = self.adapter(HeadLoss(h, torch.cat(labels), normalizer, self.backend,
                                     unlikely=unlikely))
        if anchors is not None:
            loss = loss + anchors.term(h, [it for mb in group for it in mb], normalizer)
        return loss

    @torch.no_grad()
    def supervised_states(self, items: Sequence[StepItem]) -> list[torch.Tensor]:
        """Final hidden states ``[len(labels), H]`` of each item's supervised rows (no parrot),
        in the order of ``items``, without a graph. On a sharded model every rank passes the
        same items and gets all the states."""
        if any(it.splice >= 0 for it in items):
            raise ValueError("supervised_states takes items without a parrot (splice -1)")
        out: dict[int, torch.Tensor] = {}
        for mb in self.batcher.micro_batches(items, 0):
            if self.fast:
                hidden = self.adapter(SupervisedHidden(self._token_rows(mb, None), self.backend))
            else:
                hidden = reference.plain_hidden(self.adapter, mb, None, self.pad_id)
            for it, h in zip(mb, hidden.split([len(it.labels) for it in mb])):
                out[id(it)] = h
        return [out[id(it)] for it in items]

    # -- inputs ---------------------------------------------------------------------------------
    def inputs(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
               store: PrefixStore | None = None,
               shared: SharedPrefix | None = None) -> Rows:
        """The fast forward's inputs of one micro-batch: the frozen-prefix split where it
        applies (see :meth:`Batcher.splits_prefix`), else the rows after ``shared`` (a prefix
        every item starts with, see :meth:`_shared_prefix`), else padded or packed rows."""
        n_parrot = parrot_rows(parrot)
        if self.batcher.splits_prefix(items, n_parrot):
            return prefixed_rows(items, parrot, store, pad_id=self.pad_id,
                                 device=self.adapter.device,
                                 last_layer_tail=self.last_layer_tail)
        if shared is not None:
            return shared_prefix_rows(items, parrot, shared.kv, pad_id=self.pad_id,
                                      device=self.adapter.device,
                                      last_layer_tail=self.last_layer_tail)
        return self._token_rows(items, parrot)

    def _shared_prefix(self, batches: Sequence[Sequence[StepItem]], n_parrot: int,
                       deferred: bool) -> SharedPrefix | None:
        """The prompt prefix every sequence of the micro-batches that do not split a frozen
        prefix starts with, its keys and values computed once (:class:`SharedPrefix`), or None
        when there is none worth it.

        Args:
            deferred: the micro-batches run their backward one by one (:meth:`accumulate`):
                they attend to detached copies and the prefix's own backward runs once, after
                theirs, from the copies' summed gradients.
        """
        items = [it for mb in batches if not self.batcher.splits_prefix(mb, n_parrot)
                 for it in mb]
        length = self._shared_prefix_length(items, n_parrot)
        if not length:
            return None
        return self._prefix_kv(items[0].prompt[:length], deferred)

    def _prefix_kv(self, prefix: Sequence[int], deferred: bool) -> SharedPrefix:
        """:class:`SharedPrefix` of the tokens ``prefix`` (see :meth:`_shared_prefix`)."""
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=self.adapter.device)
        kv = self.adapter(Prefix(ids, graph=True))
        if not (deferred and any(t.requires_grad for pair in kv for t in pair)):
            return SharedPrefix(kv)
        leaves = [(k.detach().requires_grad_(), v.detach().requires_grad_()) for k, v in kv]
        return SharedPrefix(leaves, graph=kv)

    def _shared_prefix_length(self, items: Sequence[StepItem], n_parrot: int) -> int:
        """Leading prompt tokens all ``items`` share, before any splice and any supervised row,
        when they are worth running once (0: none)."""
        if not (self.fast and self.min_shared_prefix > 0 and not self.packed and len(items) > 1
                and self.collective is None):
            return 0
        # Dropout would draw one mask for every row's copy of the prefix; activation
        # checkpointing would rerun the stopped prefix forward in backward.
        if self.model.training or self.adapter.checkpointing:
            return 0
        window = self.batcher.sliding_window
        if isinstance(window, int) and window > 0 and \
                max(fast_length(it, n_parrot) for it in items) >= window:
            return 0  # as for the frozen prefix: keep sliding-window masks to plain rows
        first = items[0].prompt
        # The last prompt row predicts the first label, so it stays in the rows.
        length = min(min(len(it.prompt) - 1 for it in items),
                     min((it.splice for it in items if it.splice >= 0), default=len(first)))
        if length < self.min_shared_prefix:
            return 0
        for it in items[1:]:
            p = it.prompt
            k = 0
            while k < length and p[k] == first[k]:
                k += 1
            length = k
            if length < self.min_shared_prefix:
                return 0
        return length

    def _token_rows(self, items: Sequence[StepItem], parrot: torch.Tensor | None) -> Rows:
        return token_rows(items, parrot, packed=self.packed, pad_id=self.pad_id,
                          device=self.adapter.device, last_layer_tail=self.last_layer_tail)

    def _prefix_store(self, batches: Sequence[Sequence[StepItem]],
                      n_parrot: int) -> PrefixStore | None:
        """Keys and values of every distinct prefix the split micro-batches need, from a few
        no-graph forwards over length buckets of prefixes (the buckets differ from the loss's:
        they group similar prefixes, so little padding runs).

        Packing the prefixes into one row would pad nothing, but Hugging Face models only keep
        packed sequences apart when no cache is passed, and the cache is what returns the keys
        and values.
        """
        if self._reuse is not None and not self.model.training:
            return self._reused_prefix_store(batches, n_parrot, self._reuse)
        groups = self.batcher.prefix_buckets(batches, n_parrot)
        if not groups:
            return None
        store: PrefixStore = {}
        for seqs in groups:
            for q, kv in zip(seqs, self._prefix_forward(seqs, copy=False)):
                store[q] = kv
        return store

    def _prefix_forward(self, seqs: Sequence[tuple[int, ...]], copy: bool) -> list[KV]:
        """Keys and values ``[1, kv_heads, len(q), head_dim]`` of each sequence ``q`` of one
        bucket, from one no-graph forward of the right-padded bucket; ``copy``: each its own
        tensors (to keep), else views of the bucket's."""
        ids = right_padded(seqs, max(len(q) for q in seqs), self.pad_id, self.adapter.device)
        kv = self.adapter(Prefix(ids))
        out = []
        for b, q in enumerate(seqs):
            rows = [(k[b:b + 1, :, :len(q)], v[b:b + 1, :, :len(q)]) for k, v in kv]
            out.append([(k.clone(), v.clone()) for k, v in rows] if copy else rows)
        return out

    def _reused_prefix_store(self, batches: Sequence[Sequence[StepItem]], n_parrot: int,
                             cache: FrozenPrefixCache) -> PrefixStore | None:
        """:meth:`_prefix_store` from the keys and values kept across steps: only prompts not
        kept (or kept shorter than this step's splice) run, in length buckets; every prefix is
        then the first columns of its prompt's entry."""
        version = self._weights_version()
        if cache.version != version:  # the weights were written: nothing kept is valid
            cache.clear()
            cache.version = version
        longest: dict[tuple[int, ...], int] = {}
        for mb in batches:
            if self.batcher.splits_prefix(mb, n_parrot):
                for it in mb:
                    if it.splice:  # prompts may come as lists (EncodedPrompt.ids)
                        key = tuple(it.prompt)
                        longest[key] = max(longest.get(key, 0), it.splice)
        if not longest:
            return None
        # Held here for the whole step, so an eviction by a later put cannot drop one in use.
        entries: dict[tuple[int, ...], KV] = {}
        run: dict[tuple[int, ...], tuple[int, ...]] = {}
        for prompt, s in longest.items():
            kv = cache.get(prompt)
            if kv is not None and _kv_length(kv) >= s:
                entries[prompt] = kv
                cache.hits += 1
            else:
                # Not kept: just this prefix, as a step without reuse would run (so a budget too
                # small to keep prompts costs nothing extra). Kept but shorter: it came back, so
                # the whole prompt, which covers every later splice.
                run[prompt] = prompt if kv is not None else prompt[:s]
        if run:
            prompts = list(run)
            for g in self.batcher.buckets([len(run[p]) for p in prompts]):
                group = [prompts[i] for i in g]
                for prompt, kv in zip(group, self._prefix_forward([run[p] for p in group],
                                                                  copy=True)):
                    entries[prompt] = kv
                    cache.put(prompt, kv)
                    cache.computed += 1
        store: PrefixStore = {}
        for mb in batches:
            if self.batcher.splits_prefix(mb, n_parrot):
                for it in mb:
                    if it.splice:
                        s = it.splice
                        store[tuple(it.prompt[:s])] = [(k[:, :, :s], v[:, :, :s])
                                                       for k, v in entries[tuple(it.prompt)]]
        return store


def _backward(loss: torch.Tensor) -> float:
    """One micro-batch group's backward (gradients accumulate; nothing to do without a graph);
    returns the loss value."""
    if loss.requires_grad:
        loss.backward()
    return float(loss.detach())


def _check_kind(anchors: Anchors | None, unlikely: bool) -> None:
    if unlikely and anchors is not None:
        raise ValueError("the retention term of anchors goes with the clean items' "
                         "cross-entropy, not with an unlikelihood term")


def choose_packing(adapter: ModelAdapter, packed: bool | None, *, fast: bool = True,
                   device: torch.device | None = None) -> bool:
    """Whether the engine packs: ``packed`` when given; for None (auto) packed on CUDA, where
    one large launch beats several padded buckets, provided :func:`packing_is_exact` (run on
    the model as it is, so before sharding) shows the model keeps packed sequences apart;
    padded buckets elsewhere.

    Args:
        device: where the model will run (default: where it is now).
    """
    if packed is not None:
        return packed
    dev = adapter.device if device is None else device
    return fast and dev.type == "cuda" and packing_is_exact(adapter)


@torch.no_grad()
def packing_is_exact(adapter: ModelAdapter) -> bool:
    """Whether the model keeps sequences packed into one row apart (position ids restarting).

    Architectures whose attention builds its mask from position ids (or runs flash-attn varlen)
    do; others would let packed sequences attend to each other. Two short sequences are run
    packed and one by one, and their hidden states compared.
    """
    dev = adapter.device
    a = torch.tensor([[3, 5, 7, 11, 13]], device=dev) % adapter.embed.weight.shape[0]
    b = torch.tensor([[17, 19, 23]], device=dev) % adapter.embed.weight.shape[0]
    was_training = adapter.training
    adapter.eval()
    try:
        ha = adapter.hidden_states(adapter.embed(a))
        hb = adapter.hidden_states(adapter.embed(b))
        pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=dev)
        hp = adapter.hidden_states(adapter.embed(torch.cat([a, b], 1)), position_ids=pos)
    except Exception:  # an architecture that refuses position ids this way: do not pack
        return False
    finally:
        adapter.train(was_training)
    ref = torch.cat([ha, hb], 1).float()
    tol = 1e-3 if ref.dtype == torch.float32 and ha.dtype == torch.float32 else 5e-2
    return bool(((hp.float() - ref).abs().max() <= tol * ref.abs().max().clamp_min(1.0)).item())
