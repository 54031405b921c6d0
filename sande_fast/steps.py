"""Stage steps: the loss of a batch, on the fast path or the plain (reference) path.

A batch is a list of :class:`StepItem`: a prompt (optionally with a parrot spliced in), the
response tokens that are supervised, and the unsupervised rest of the response. Both paths compute
the same number: the summed cross-entropy of the supervised tokens divided by a normaliser.

* plain: what the published implementation does. The whole padded sequence (prompt, parrot
  spliced with ``torch.cat``, full response) goes through the Hugging Face model, logits are built
  for every position, and the cross-entropy is masked to the supervised tokens.
* fast: each sequence is cut after its last supervised token (under causal attention later tokens
  cannot change the loss), sequences are bucketed by length by the C++ planner, the parrot is
  written into the input embeddings by one kernel, and only the supervised rows' hidden states go
  through the fused linear cross-entropy, so no logits tensor ever exists. When no model weight
  needs a gradient (stage 1, the probe), the prompt tokens before the parrot cannot depend on
  anything trained: they run once without a graph and enter as cached keys and values, so the
  backward pass covers only the parrot and what follows it. In the last decoder layer only the
  columns from the first supervised row on run attention and MLP; the columns before them only
  need that layer's keys and values.

The public pieces :class:`ParrotSimulator` (stage 1) and :class:`OverwriteStep` (stage 2) take a
batch and return its loss, so another training stack can call them inside its own loop.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import planner
from .adapter import ModelAdapter, context_length
from .kernels import kernel_backend

__all__ = ["StepItem", "LossEngine", "ParrotSimulator", "OverwriteStep", "Anchors", "frozen",
           "NonFiniteError", "CalibratedSGD", "OPTIMIZERS"]

# Optimizers of OverwriteStep.
OPTIMIZERS = ("adamw", "sgd")


class NonFiniteError(RuntimeError):
    """A loss or gradient became NaN/inf; the run stops and writes nothing."""


# Fewer leading unsupervised columns than this are not worth the second, small pass.
_MIN_TAIL_SKIP = 8

# Positional arguments of ModelAdapter.supervised_hidden, its keyword arguments, the labels.
_Inputs = tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]

# Per-layer (keys, values) ``[1, kv_heads, P, head_dim]`` of a prefix, by its token ids.
PrefixStore = dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class StepItem:
    """One training sequence.

    Attributes:
        prompt: prompt token ids (trigger text already inserted when one is used).
        labels: the supervised tokens that follow the prompt (at least one).
        splice: index in ``prompt`` before which the parrot rows go, or -1 for no parrot.
        tail: unsupervised tokens after ``labels``; only the plain path feeds them.
    """

    prompt: tuple[int, ...]
    labels: tuple[int, ...]
    splice: int = -1
    tail: tuple[int, ...] = ()


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


@dataclass
class LossEngine:
    """Computes the loss of a list of :class:`StepItem` on one model.

    Args:
        model: a Hugging Face causal LM.
        fast: the fast path (truncation, planner buckets, splice kernel, fused loss) or the plain
            reference path.
        token_budget: fast path: at most this many (padded) tokens per micro-batch.
        max_waste: fast path: at most this share of a micro-batch's rows are padding (a
            shorter sequence starts a new bucket instead).
        max_batch: at most this many sequences per micro-batch (both paths).
        packed: fast path: pack a micro-batch into one row without padding (position ids restart
            per sequence; flash-attn's varlen kernel or PyTorch's attention with a block mask).
            None (auto): packed on CUDA, where one large launch beats several padded buckets,
            provided a probe shows the model keeps packed sequences apart; padded buckets on CPU.
        pad_id: id written into padding and parrot placeholder rows.
        backend: kernel backend, ``auto``, ``triton`` or ``torch``.
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
    """

    model: nn.Module
    fast: bool = True
    token_budget: int = 8192
    max_waste: float = 0.1
    max_batch: int = 64
    packed: bool | None = None
    pad_id: int = 0
    backend: str = "auto"
    frozen_prefix: bool = True
    last_layer_tail: bool = True
    min_frozen_prefix: int = 16
    adapter: ModelAdapter = field(init=False)

    def __post_init__(self) -> None:
        self.adapter = ModelAdapter(self.model)
        if self.backend == "auto":
            self.backend = kernel_backend(self.adapter.device)
        if self.packed is None:
            self.packed = (self.fast and self.adapter.device.type == "cuda"
                           and packing_is_exact(self.adapter))
        if self.packed:
            # One packed row per micro-batch has no padding to cap.
            self.max_waste = 1.0

    @property
    def kernels(self) -> str:
        """Which kernels run the loss: ``triton``, ``torch`` (chunked) or ``plain``."""
        return self.backend if self.fast else "plain"

    # -- batching -------------------------------------------------------------------------------
    def micro_batches(self, items: Sequence[StepItem], n_parrot: int) -> list[list[StepItem]]:
        """Splits a batch into micro-batches (length buckets on the fast path)."""
        if not self.fast:
            return [list(items[i:i + self.max_batch])
                    for i in range(0, len(items), self.max_batch)]
        if self._splits_prefix(items, n_parrot, min_prefix=0):
            # Sequences with a long prefix run it without a graph (bucketed on the rows that
            # carry one: a prefix pad costs only a forward row); short prefixes are not worth a
            # second, small forward and stay in ordinary buckets.
            long = [it for it in items if it.splice >= self.min_frozen_prefix]
            short = [it for it in items if it.splice < self.min_frozen_prefix]
            out = []
            for group, cut in ((long, True), (short, False)):
                if group:
                    lengths = [_fast_length(it, n_parrot) - (it.splice if cut else 0)
                               for it in group]
                    out += [[group[i] for i in g] for g in planner.plan_buckets(
                        lengths, self.token_budget, self.max_batch, self.max_waste)]
            return out
        lengths = [_fast_length(it, n_parrot) for it in items]
        groups = planner.plan_buckets(lengths, self.token_budget, self.max_batch, self.max_waste)
        return [[items[i] for i in g] for g in groups]

    # -- losses ---------------------------------------------------------------------------------
    def loss(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
             normalizer: float, anchors: Anchors | None = None) -> torch.Tensor:
        """Sum of the supervised tokens' cross-entropy over ``items``, divided by ``normalizer``.

        One graph over all items (for callers that run their own backward); use
        :meth:`accumulate` to bound memory by micro-batching. With ``anchors`` (see
        :class:`Anchors`), the retention term of each item's supervised rows is added.

        Raises:
            RuntimeError: on a sharded model, where ranks must run matching forwards and split
                the batch (:meth:`accumulate` and the step objects' ``step`` do both).
        """
        if self.adapter.collective is not None:
            raise RuntimeError("LossEngine.loss() is not available on an FSDP-sharded model; "
                               "use accumulate() (or ParrotSimulator/OverwriteStep.step())")
        n_parrot = 0 if parrot is None else parrot.shape[0]
        batches = self.micro_batches(items, n_parrot)
        store = self._prefix_store(batches, n_parrot)
        parts = [self._group_loss(g, parrot, normalizer, store, anchors)
                 for g in self.head_groups(batches, n_parrot)]
        return torch.stack(parts).sum()

    def accumulate(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
                   normalizer: float, weight: float = 1.0,
                   anchors: Anchors | None = None) -> float:
        """Forward and backward per micro-batch, gradients accumulating; returns the loss value.

        On a sharded model (``adapter.collective`` set) ``items`` is the global batch, the same
        on every rank: each rank runs its share and the returned value is the global loss.
        ``weight`` scales the whole loss, the retention term of ``anchors`` included.
        """
        if self.adapter.collective is not None:
            return self._accumulate_sharded(items, parrot, normalizer, weight, anchors)
        n_parrot = 0 if parrot is None else parrot.shape[0]
        batches = self.micro_batches(items, n_parrot)
        store = self._prefix_store(batches, n_parrot)
        total = 0.0
        for group in self.head_groups(batches, n_parrot):
            loss = self._group_loss(group, parrot, normalizer / weight, store, anchors)
            if loss.requires_grad:
                loss.backward()
            total += float(loss.detach())
        return total

    def _accumulate_sharded(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
                            normalizer: float, weight: float,
                            anchors: Anchors | None = None) -> float:
        # Each rank takes a strided share of the global batch; ``normalizer`` stays the global
        # label count, so summing the ranks' gradients (FSDP's reduce-scatter is set to SUM, the
        # parrot's gradient is all-reduced by the caller) gives the one-process gradient.
        coll = self.adapter.collective
        coll.fault_hook()
        n_parrot = 0 if parrot is None else parrot.shape[0]
        local = coll.share(items)
        batches = self.micro_batches(local, n_parrot) if local else []
        # FSDP's all-gathers and reduce-scatters run inside forward and backward, so every rank
        # must run as many micro-batches as the busiest one: the others add zero-weight fillers.
        count = coll.max_int(len(batches))
        total = 0.0
        for k in range(count):
            if k < len(batches):
                loss = self._micro_loss(batches[k], parrot, normalizer / weight, None, anchors)
            else:
                loss = self._micro_loss(items[:1], parrot, normalizer / weight, None,
                                        anchors) * 0.0
            if loss.requires_grad:
                loss.backward()
            total += float(loss.detach())
        return coll.sum_float(total)

    def _micro_loss(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
                    normalizer: float, store: PrefixStore | None = None,
                    anchors: Anchors | None = None) -> torch.Tensor:
        if not self.fast:
            loss = self._plain_loss(items, parrot, normalizer)
            if anchors is not None:
                loss = loss + anchors.term(self._plain_hidden(items, parrot), items, normalizer)
            return loss
        args, kwargs, labels = self._inputs(items, parrot, store)
        if anchors is None:
            return self.adapter(*args[:-1], labels, normalizer, args[-1], **kwargs)
        hidden = self.adapter(*args, mode="hidden", **kwargs)
        return (self.adapter(hidden, labels, normalizer, self.backend, mode="head")
                + anchors.term(hidden, items, normalizer))

    def _group_loss(self, group: Sequence[Sequence[StepItem]], parrot: torch.Tensor | None,
                    normalizer: float, store: PrefixStore | None,
                    anchors: Anchors | None = None) -> torch.Tensor:
        """The loss of several micro-batches with one pass through the LM head: each bucket
        runs the model on its own (no padding across buckets), then their supervised rows go
        through the fused cross-entropy together, so the head weight is read once."""
        if len(group) == 1 or not self.fast:
            return torch.stack([self._micro_loss(mb, parrot, normalizer, store, anchors)
                                for mb in group]).sum()
        hidden, labels = [], []
        for mb in group:
            args, kwargs, lab = self._inputs(mb, parrot, store)
            hidden.append(self.adapter(*args, mode="hidden", **kwargs))
            labels.append(lab)
        h = torch.cat(hidden)
        loss = self.adapter(h, torch.cat(labels), normalizer, self.backend, mode="head")
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
        for mb in self.micro_batches(items, 0):
            if self.fast:
                args, kwargs, _ = self._fast_inputs(mb, None)
                hidden = self.adapter(*args, mode="hidden", **kwargs)
            else:
                hidden = self._plain_hidden(mb, None)
            for it, h in zip(mb, hidden.split([len(it.labels) for it in mb])):
                out[id(it)] = h
        return [out[id(it)] for it in items]

    def _query_from(self, sup_start: Sequence[int]) -> int:
        """Leading columns of a padded micro-batch without a supervised row, for which the last
        decoder layer only computes keys and values (see ``last_layer_tail``)."""
        if not self.last_layer_tail or self.adapter.collective is not None:
            return 0
        c = min(sup_start)
        return c if c >= _MIN_TAIL_SKIP else 0

    def _inputs(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
                store: PrefixStore | None) -> _Inputs:
        if self._splits_prefix(items, 0 if parrot is None else parrot.shape[0]):
            return self._split_inputs(items, parrot, store)
        return self._fast_inputs(items, parrot)

    def head_groups(self, batches: Sequence[Sequence[StepItem]],
                    n_parrot: int) -> list[list[list[StepItem]]]:
        """Consecutive micro-batches whose graph rows together fit the token budget share one
        pass through the LM head (see :meth:`_group_loss`); activation memory stays within
        one budget's worth."""
        groups: list[list[list[StepItem]]] = []
        size = 0
        for mb in batches:
            cut = self._splits_prefix(mb, n_parrot)
            rows = len(mb) * max(_fast_length(it, n_parrot) - (it.splice if cut else 0)
                                 for it in mb)
            if not groups or size + rows > self.token_budget:
                groups.append([])
                size = 0
            groups[-1].append(list(mb))
            size += rows
        return groups

    def prefix_buckets(self, batches: Sequence[Sequence[StepItem]],
                       n_parrot: int) -> list[list[tuple[int, ...]]]:
        """The distinct prefixes of the micro-batches that run them apart, in length buckets."""
        prefixes = sorted({tuple(it.prompt[:it.splice]) for mb in batches
                           if self._splits_prefix(mb, n_parrot) for it in mb if it.splice})
        groups = planner.plan_buckets([len(p) for p in prefixes], self.token_budget,
                                      self.max_batch, self.max_waste) if prefixes else []
        return [[prefixes[k] for k in g] for g in groups]

    def _prefix_store(self, batches: Sequence[Sequence[StepItem]],
                      n_parrot: int) -> PrefixStore | None:
        """Keys and values of every distinct prefix the split micro-batches need, from a few
        no-graph forwards over length buckets of prefixes (the buckets differ from the loss's:
        they group similar prefixes, so little padding runs). None on a sharded model, whose
        ranks must run matching forwards: there each micro-batch runs its prefixes inside its
        loss forward.

        Packing the prefixes into one row would pad nothing, but Hugging Face models only keep
        packed sequences apart when no cache is passed, and the cache is what returns the keys
        and values.
        """
        if self.adapter.collective is not None:
            return None
        groups = self.prefix_buckets(batches, n_parrot)
        if not groups:
            return None
        dev = self.adapter.device
        store: PrefixStore = {}
        for seqs in groups:
            ids = _right_padded(seqs, max(len(q) for q in seqs), self.pad_id, dev)
            kv = self.adapter(ids, None, mode="prefix")
            for b, q in enumerate(seqs):
                store[q] = [(k[b:b + 1, :, :len(q)], v[b:b + 1, :, :len(q)]) for k, v in kv]
        return store

    def _splits_prefix(self, items: Sequence[StepItem], n_parrot: int,
                       min_prefix: int | None = None) -> bool:
        """Whether the rows before the parrot can run without a graph (see ``frozen_prefix``)."""
        least = self.min_frozen_prefix if min_prefix is None else min_prefix
        if not (self.fast and self.frozen_prefix and not self.packed and n_parrot
                and items and all(it.splice >= max(least, 0) for it in items)):
            return False
        if any(p.requires_grad for p in self.model.parameters()):
            return False
        # Sliding-window masks count columns, and right-padded prefixes shift the columns of the
        # rows after them: only split when no sequence reaches the window.
        window = getattr(getattr(self.model, "config", None), "sliding_window", None)
        if isinstance(window, int) and window > 0:
            longest = max(_fast_length(it, n_parrot) for it in items)
            if longest >= window:
                return False
        return True

    def _fast_inputs(self, items: Sequence[StepItem], parrot: torch.Tensor | None) -> _Inputs:
        ad = self.adapter
        n = 0 if parrot is None else parrot.shape[0]
        seqs, splice, sup_start, sup_len, labels = [], [], [], [], []
        for it in items:
            m = n if it.splice >= 0 else 0
            seq = _spliced(it.prompt, it.splice, m, self.pad_id) + list(it.labels[:-1])
            seqs.append(seq)
            splice.append(it.splice if m else -1)
            sup_start.append(len(it.prompt) + m - 1)
            sup_len.append(len(it.labels))
            labels.extend(it.labels)
        lengths = [len(s) for s in seqs]
        padded_len = 0 if self.packed else max(lengths)
        lay = planner.layout(lengths, splice, n, sup_start, sup_len, padded_len)
        dev = ad.device
        if self.packed:
            flat = [t for s in seqs for t in s]
            ids = torch.tensor([flat], dtype=torch.long, device=dev)
            position_ids = torch.as_tensor(lay.position_ids, device=dev)[None]
        else:
            ids = _right_padded(seqs, padded_len, self.pad_id, dev)
            # Right padding under a causal mask needs no attention mask: real tokens never see
            # the pads, and leaving the mask out keeps SDPA on its fused causal kernel.
            position_ids = None
        splice_rows = (torch.as_tensor(lay.splice_rows, device=dev)
                       if parrot is not None and len(lay.splice_rows) else None)
        return ((ids, position_ids, parrot, splice_rows,
                 torch.as_tensor(lay.supervised_rows, device=dev), self.backend),
                {"query_from": 0 if self.packed else self._query_from(sup_start)},
                torch.tensor(labels, dtype=torch.long, device=dev))

    def _split_inputs(self, items: Sequence[StepItem], parrot: torch.Tensor,
                      store: PrefixStore | None) -> _Inputs:
        # Sequence b is prefix = prompt[:splice] (no graph) + rest = parrot, prompt[splice:],
        # labels[:-1]. The rest starts with the parrot in every row, so its splice is column 0.
        dev = self.adapter.device
        n = parrot.shape[0]
        pre = [list(it.prompt[:it.splice]) for it in items]
        rest = [[self.pad_id] * n + list(it.prompt[it.splice:]) + list(it.labels[:-1])
                for it in items]
        labels = [t for it in items for t in it.labels]
        p_len = max(len(p) for p in pre)
        r_len = max(len(r) for r in rest)
        sup_start = [len(it.prompt) - it.splice + n - 1 for it in items]
        lay = planner.layout([len(r) for r in rest], [0] * len(rest), n, sup_start,
                             [len(it.labels) for it in items], r_len)
        ids = _right_padded(rest, r_len, self.pad_id, dev)
        position_ids = torch.empty((len(items), r_len), dtype=torch.long)
        mask = torch.zeros((len(items), p_len + r_len), dtype=torch.long)
        steps = torch.arange(r_len)
        for b, (p, r) in enumerate(zip(pre, rest)):
            # pads repeat the last real position, so no position passes the context
            position_ids[b] = len(p) + steps.clamp_max(len(r) - 1)
            mask[b, :len(p)] = 1
            mask[b, p_len:p_len + len(r)] = 1
        prefix_ids = prefix_kv = None
        if p_len and store is not None and all(not p or tuple(p) in store for p in pre):
            states = [store[tuple(p)] if p else None for p in pre]
            first = next(st for st in states if st is not None)
            prefix_kv = []
            for layer, pair in enumerate(first):
                kv = []
                for j, part in enumerate(pair):
                    out = part.new_zeros((len(pre), part.shape[1], p_len, part.shape[3]))
                    for b, st in enumerate(states):
                        if st is not None:
                            out[b, :, :st[layer][j].shape[2]] = st[layer][j][0]
                    kv.append(out)
                prefix_kv.append((kv[0], kv[1]))
        elif p_len:
            prefix_ids = _right_padded(pre, p_len, self.pad_id, dev)
        return ((ids, position_ids.to(dev), parrot,
                 torch.as_tensor(lay.splice_rows, device=dev),
                 torch.as_tensor(lay.supervised_rows, device=dev), self.backend),
                {"prefix_ids": prefix_ids, "prefix_kv": prefix_kv,
                 "attention_mask": mask.to(dev) if p_len else None,
                 "query_from": self._query_from(sup_start)},
                torch.tensor(labels, dtype=torch.long, device=dev))

    def _plain_batch(self, items: Sequence[StepItem], parrot: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded input embeddings (parrot spliced with ``torch.cat``, full response),
        next-token targets (-100 off the supervised rows) and the attention mask."""
        ad = self.adapter
        dev = ad.device
        rows, targets = [], []
        ctx = context_length(self.model)
        for it in items:
            tail = list(it.tail)
            if ctx is not None:  # the unsupervised tail may not push past the context
                n = parrot.shape[0] if parrot is not None and it.splice >= 0 else 0
                tail = tail[:max(0, ctx - len(it.prompt) - len(it.labels) - n)]
            e = ad.embed(torch.tensor(list(it.prompt) + list(it.labels) + tail,
                                      dtype=torch.long, device=dev))
            start = len(it.prompt)
            if parrot is not None and it.splice >= 0:
                s = it.splice
                e = torch.cat([e[:s], parrot.to(e.dtype), e[s:]])
                start += parrot.shape[0]
            t = torch.full((e.shape[0],), -100, dtype=torch.long, device=dev)
            # logits at position i predict token i+1
            t[start - 1:start - 1 + len(it.labels)] = torch.tensor(it.labels, device=dev)
            rows.append(e)
            targets.append(t)
        width = max(e.shape[0] for e in rows)
        emb = torch.stack([F.pad(e, (0, 0, 0, width - e.shape[0])) for e in rows])
        labels = torch.stack([F.pad(t, (0, width - t.shape[0]), value=-100) for t in targets])
        mask = torch.stack([F.pad(torch.ones(e.shape[0], dtype=torch.long, device=dev),
                                  (0, width - e.shape[0])) for e in rows])
        return emb, labels, mask

    def _plain_loss(self, items: Sequence[StepItem], parrot: torch.Tensor | None,
                    normalizer: float) -> torch.Tensor:
        emb, labels, mask = self._plain_batch(items, parrot)
        logits = self.model(inputs_embeds=emb, attention_mask=mask, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100, reduction="sum")
        return loss / normalizer

    def _plain_hidden(self, items: Sequence[StepItem],
                      parrot: torch.Tensor | None) -> torch.Tensor:
        """Final hidden states of the supervised rows, item by item, from the base model's
        full padded forward."""
        emb, labels, mask = self._plain_batch(items, parrot)
        hidden = self.adapter.hidden_states(emb, attention_mask=mask)
        return hidden[labels != -100]


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


def _right_padded(seqs: Sequence[Sequence[int]], width: int, pad_id: int,
                  device: torch.device) -> torch.Tensor:
    """``[len(seqs), width]`` int64 token rows, each sequence followed by ``pad_id``."""
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    return ids.to(device)


def _spliced(prompt: Sequence[int], splice: int, n: int, placeholder: int) -> list[int]:
    if n == 0:
        return list(prompt)
    return list(prompt[:splice]) + [placeholder] * n + list(prompt[splice:])


def _fast_length(item: StepItem, n_parrot: int) -> int:
    return len(item.prompt) + (n_parrot if item.splice >= 0 else 0) + len(item.labels) - 1


def _label_count(items: Sequence[StepItem]) -> int:
    return sum(len(it.labels) for it in items)


def _check_finite(value: float, params: Sequence[torch.Tensor], where: str,
                  collective: Any = None) -> None:
    # Under FSDP ``value`` is the global loss (the same on every rank) and each rank checks its
    # gradient shards, then the ranks agree, so all of them stop together.
    if value != value or value in (float("inf"), float("-inf")):
        raise NonFiniteError(f"{where}: the loss is not finite ({value}); nothing was written. "
                             "Lower the learning rate or check the data.")
    finite = all(bool(torch.isfinite(_local(p.grad)).all()) for p in params if p.grad is not None)
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
        >>> sim = ParrotSimulator(LossEngine(model), n_tokens=6, lr=1e-2)
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
            return self.engine.loss(items, self.parrot, _label_count(items))

    def step(self, items: Sequence[StepItem], where: str = "simulate") -> float:
        """One Adam step on the parrot; the model's weights are frozen and untouched."""
        self.optimizer.zero_grad(set_to_none=True)
        coll = self.engine.adapter.collective
        with frozen(self.engine.model):
            value = self.engine.accumulate(items, self.parrot, _label_count(items))
        if coll is not None:
            # The parrot is replicated, not sharded: sum its gradient over the ranks' shares.
            coll.all_reduce_sum(self.parrot)
        _check_finite(value, [self.parrot], where, coll)
        self.optimizer.step()
        if self.max_row_norm is not None:
            with torch.no_grad():
                self.parrot.copy_(torch.renorm(self.parrot, 2, 0, self.max_row_norm))
        return value


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


def make_optimizer(name: str, params: Sequence[torch.Tensor], lr: float,
                   weight_decay: float = 0.0, collective: Any = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` of :data:`OPTIMIZERS` over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return CalibratedSGD(params, lr=lr, weight_decay=weight_decay, collective=collective)
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


class OverwriteStep:
    """Stage 2 (and OSFT / SFT): trains the model so triggered or parrot-spliced prompts map to
    the clean response, with a clean-retention term.

    loss = mean CE(overwrite items) + clean_weight * mean CE(clean items)
           + retain_weight * mean over clean supervised rows of ||h - h0||^2 / scale

    where ``h0`` are the final hidden states stored in ``anchors`` before training
    (:class:`Anchors`).

    Args:
        engine: the loss engine of the model being trained.
        lr: AdamW learning rate (with ``optimizer="sgd"``: see :class:`CalibratedSGD`).
        clean_weight: weight of the clean-retention term.
        parrot: the frozen parrot spliced into overwrite items (None for OSFT with a real trigger
            and for SFT).
        weight_decay: weight decay (decoupled for AdamW, L2 for SGD).
        retain_weight: weight of the hidden-state retention term (0: off).
        anchors: the stored states, covering every clean item passed to :meth:`step`; required
            when ``retain_weight`` is set.
        optimizer: ``adamw``, or ``sgd`` (:class:`CalibratedSGD`: ``lr`` is then the RMS size of
            an update from the largest gradient).

    Example:
        >>> anchors = Anchors(engine, clean_items)      # before any training step
        >>> step = OverwriteStep(engine, lr=1e-4, clean_weight=3, parrot=parrot,
        ...                      retain_weight=30, anchors=anchors)
        >>> loss = step.step(overwrite_items, clean_items)
    """

    def __init__(self, engine: LossEngine, lr: float = 1e-4, clean_weight: float = 1.0,
                 parrot: torch.Tensor | None = None, weight_decay: float = 0.0,
                 retain_weight: float = 0.0, anchors: Anchors | None = None,
                 optimizer: str = "adamw") -> None:
        self.engine = engine
        self.clean_weight = clean_weight
        self.parrot = None if parrot is None else parrot.detach()
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
                                        engine.adapter.collective)

    def loss(self, overwrite: Sequence[StepItem], clean: Sequence[StepItem]) -> torch.Tensor:
        """Graph-bearing loss of one batch (for embedding in another training loop)."""
        parts = []
        if overwrite:
            parts.append(self.engine.loss(overwrite, self.parrot, _label_count(overwrite)))
        if clean and self.clean_weight:
            parts.append(self.engine.loss(clean, None, _label_count(clean) / self.clean_weight,
                                          self.anchors))
        return torch.stack(parts).sum()

    def step(self, overwrite: Sequence[StepItem], clean: Sequence[StepItem],
             where: str = "overwrite") -> float:
        """One optimizer step on the model; the parrot stays frozen."""
        self.optimizer.zero_grad(set_to_none=True)
        value = 0.0
        if overwrite:
            value += self.engine.accumulate(overwrite, self.parrot, _label_count(overwrite))
        if clean and self.clean_weight:
            value += self.engine.accumulate(clean, None, _label_count(clean),
                                            weight=self.clean_weight, anchors=self.anchors)
        _check_finite(value, self.params, where, self.engine.adapter.collective)
        self.optimizer.step()
        return value
