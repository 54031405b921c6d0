"""Typed inputs of the fast forward of one micro-batch, and their builders.

* :class:`Rows`: right-padded token rows (or one packed row with restarting position ids),
  placeholder ids where the parrot goes, the flat rows where each parrot starts and the flat rows
  whose next token is supervised. Built by :func:`token_rows`.
* :class:`PrefixedRows`: the frozen-prefix split. Each sequence's prompt before the parrot (its
  prefix) runs without a graph, either here as ``prefix_ids`` or already as ``prefix_kv``; the
  rows carry the rest (parrot first, so every splice is at column 0). Built by
  :func:`prefixed_rows`. Its shared form (:func:`shared_prefix_rows`): one prompt prefix common
  to every row (a chat template's system block), its keys and values computed once (with a
  graph when the model trains) and expanded to the rows.

The flat index arrays come from the C++ planner (:func:`sande_fast.planner.layout`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from . import planner
from .batching import StepItem, fast_length, parrot_rows, right_padded, spliced, spliced_parrots

__all__ = ["Rows", "PrefixedRows", "PrefixStore", "KV", "token_rows", "prefixed_rows",
           "shared_prefix_rows", "query_from", "MIN_TAIL_SKIP"]

# Fewer leading unsupervised columns than this are not worth the second, small pass.
MIN_TAIL_SKIP = 8

# Per-layer (keys, values) ``[B, kv_heads, P, head_dim]``.
KV = list[tuple[torch.Tensor, torch.Tensor]]

# Per-layer (keys, values) ``[1, kv_heads, P, head_dim]`` of a prefix, by its token ids.
PrefixStore = dict[tuple[int, ...], KV]


@dataclass(frozen=True)
class Rows:
    """The fast forward's inputs of one micro-batch.

    Attributes:
        ids: ``[B, L]`` int64 token ids (right-padded rows, or one packed row), placeholder ids
            where the parrot goes.
        supervised_rows: ``[R]`` int64 flat rows (of ``[B*L]``) whose next token is supervised.
        labels: ``[R]`` int64 next-token labels of those rows.
        position_ids: ``[1, L]`` for a packed row (restarting per sequence), else None.
        parrot: ``[n, H]`` soft prompt, ``[S, n, H]`` one per splice (several backdoors'
            parrots in one micro-batch), or None.
        splice_rows: ``[S]`` int64 flat row of each splice start, or None for no parrot.
        query_from: right-padded rows only: no supervised row lies in the first this many
            columns, so the last decoder layer only needs their keys and values. 0: one
            ordinary pass.
    """

    ids: torch.Tensor
    supervised_rows: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    parrot: torch.Tensor | None = None
    splice_rows: torch.Tensor | None = None
    query_from: int = 0


@dataclass(frozen=True)
class PrefixedRows(Rows):
    """:class:`Rows` of the rest of each sequence after a prefix that needs no gradient.

    Attributes:
        prefix_ids: ``[B, P]`` right-padded prefix tokens; they run once without a graph and the
            rows attend to their keys and values.
        prefix_kv: instead of ``prefix_ids``, their per-layer keys and values
            ``[B, kv_heads, P, head_dim]``, already computed.
        attention_mask: ``[B, P+L]`` int64, 1 for real tokens (prefix, then rows); None when
            no sequence has a prefix, or when every row has the same one.

    ``position_ids`` is ``[B, L]``: each row continues after its own prefix.
    """

    prefix_ids: torch.Tensor | None = None
    prefix_kv: KV | None = None
    attention_mask: torch.Tensor | None = None


def query_from(sup_start: Sequence[int], enabled: bool) -> int:
    """Leading columns of a padded micro-batch without a supervised row, for which the last
    decoder layer only computes keys and values (0: none, or not worth a second pass)."""
    if not enabled:
        return 0
    c = min(sup_start)
    return c if c >= MIN_TAIL_SKIP else 0


def token_rows(items: Sequence[StepItem], parrot: torch.Tensor | None, *, packed: bool,
               pad_id: int, device: torch.device, last_layer_tail: bool) -> Rows:
    """Right-padded rows (or one packed row) of ``items``, each cut after its last supervised
    token's input row, with placeholder ids ``pad_id`` where the parrot goes.

    Args:
        last_layer_tail: padded rows may skip the last layer's work on leading unsupervised
            columns (see :attr:`Rows.query_from`).
    """
    n = parrot_rows(parrot)
    seqs, splice, sup_start, sup_len, labels = [], [], [], [], []
    for it in items:
        m = n if it.splice >= 0 else 0
        seq = spliced(it.prompt, it.splice, m, pad_id) + list(it.labels[:-1])
        seqs.append(seq)
        splice.append(it.splice if m else -1)
        sup_start.append(len(it.prompt) + m - 1)
        sup_len.append(len(it.labels))
        labels.extend(it.labels)
    lengths = [len(s) for s in seqs]
    padded_len = 0 if packed else max(lengths)
    lay = planner.layout(lengths, splice, n, sup_start, sup_len, padded_len)
    if packed:
        flat = [t for s in seqs for t in s]
        ids = torch.tensor([flat], dtype=torch.long, device=device)
        position_ids = torch.as_tensor(lay.position_ids, device=device)[None]
    else:
        ids = right_padded(seqs, padded_len, pad_id, device)
        # Right padding under a causal mask needs no attention mask: real tokens never see
        # the pads, and leaving the mask out keeps SDPA on its fused causal kernel.
        position_ids = None
    splice_rows = (torch.as_tensor(lay.splice_rows, device=device)
                   if parrot is not None and len(lay.splice_rows) else None)
    return Rows(ids=ids, supervised_rows=torch.as_tensor(lay.supervised_rows, device=device),
                labels=torch.tensor(labels, dtype=torch.long, device=device),
                position_ids=position_ids, parrot=spliced_parrots(items, parrot),
                splice_rows=splice_rows,
                query_from=0 if packed else query_from(sup_start, last_layer_tail))


def prefixed_rows(items: Sequence[StepItem], parrot: torch.Tensor, store: PrefixStore | None, *,
                  pad_id: int, device: torch.device, last_layer_tail: bool) -> PrefixedRows:
    """The frozen-prefix split of ``items`` (every one with a parrot): prefix
    ``prompt[:splice]`` without a graph, rows ``parrot, prompt[splice:], labels[:-1]``.

    Args:
        store: keys and values of prefixes computed beforehand; when it holds every prefix of
            ``items`` they enter as ``prefix_kv``, else the prefixes run as ``prefix_ids``.
    """
    # The rest starts with the parrot in every row, so its splice is column 0.
    n = parrot_rows(parrot)
    pre = [list(it.prompt[:it.splice]) for it in items]
    rest = [[pad_id] * n + list(it.prompt[it.splice:]) + list(it.labels[:-1]) for it in items]
    labels = [t for it in items for t in it.labels]
    p_len = max(len(p) for p in pre)
    r_len = max(len(r) for r in rest)
    sup_start = [len(it.prompt) - it.splice + n - 1 for it in items]
    lay = planner.layout([len(r) for r in rest], [0] * len(rest), n, sup_start,
                         [len(it.labels) for it in items], r_len)
    ids = right_padded(rest, r_len, pad_id, device)
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
        prefix_kv = _stacked_prefix_kv([store[tuple(p)] if p else None for p in pre], p_len)
    elif p_len:
        prefix_ids = right_padded(pre, p_len, pad_id, device)
    return PrefixedRows(ids=ids, supervised_rows=torch.as_tensor(lay.supervised_rows,
                                                                 device=device),
                        labels=torch.tensor(labels, dtype=torch.long, device=device),
                        position_ids=position_ids.to(device),
                        parrot=spliced_parrots(items, parrot),
                        splice_rows=torch.as_tensor(lay.splice_rows, device=device),
                        query_from=query_from(sup_start, last_layer_tail),
                        prefix_ids=prefix_ids, prefix_kv=prefix_kv,
                        attention_mask=mask.to(device) if p_len else None)


def shared_prefix_rows(items: Sequence[StepItem], parrot: torch.Tensor | None, prefix_kv: KV, *,
                       pad_id: int, device: torch.device,
                       last_layer_tail: bool) -> PrefixedRows:
    """``items`` whose prompts all start with the same tokens, none of them supervised and none
    after a splice, given those tokens' keys and values ``prefix_kv``
    ``[1, kv_heads, P, head_dim]`` (computed once, with a graph when the model trains): the
    rest of each sequence as right-padded rows attending to them.

    The keys and values are expanded to the rows (a view; its backward sums the rows'
    gradients into the one prefix). Every row's prefix has the same length, so columns keep
    their positions and the plain causal mask (offset by the prefix) is exact: no attention
    mask is needed.
    """
    length = prefix_kv[0][0].shape[2]
    rest = [replace(it, prompt=tuple(it.prompt[length:]),
                    splice=it.splice - length if it.splice >= 0 else -1) for it in items]
    rows = token_rows(rest, parrot, packed=False, pad_id=pad_id, device=device,
                      last_layer_tail=last_layer_tail)
    n = parrot_rows(parrot)
    b, width = rows.ids.shape
    last = torch.tensor([fast_length(it, n) - 1 for it in rest])[:, None]
    # pads repeat the last real position, so no position passes the context
    position_ids = length + torch.arange(width)[None].expand(b, -1).minimum(last)
    kv = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_kv]
    return PrefixedRows(ids=rows.ids, supervised_rows=rows.supervised_rows, labels=rows.labels,
                        position_ids=position_ids.to(device), parrot=rows.parrot,
                        splice_rows=rows.splice_rows, query_from=rows.query_from,
                        prefix_kv=kv)


def _stacked_prefix_kv(states: Sequence[KV | None], p_len: int) -> KV:
    """Per-layer keys and values ``[B, kv_heads, p_len, head_dim]`` of each row's stored prefix
    (right-padded with zeros; a row without a prefix is all zeros)."""
    first = next(st for st in states if st is not None)
    out: KV = []
    for layer, pair in enumerate(first):
        kv = []
        for j, part in enumerate(pair):
            t = part.new_zeros((len(states), part.shape[1], p_len, part.shape[3]))
            for b, st in enumerate(states):
                if st is not None:
                    t[b, :, :st[layer][j].shape[2]] = st[layer][j][0]
            kv.append(t)
        out.append((kv[0], kv[1]))
    return out
