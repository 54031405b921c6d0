"""Token trees: sequences that start alike, run once as one row.

A stage-2 step trains three kinds of sequence on every drawn prompt: the overwrite item (the
prompt with the parrot spliced in, then the clean answer), its unlikelihood twin (the same
spliced prompt, then the target) and the clean item (the prompt, then the clean answer). The
twin repeats every token of the overwrite item before the answer, and the clean item repeats
the prompt before the splice. A *tree row* holds the union of such sequences once: the trie of
their tokens, laid out depth first, where each token attends to itself and its ancestors (the
earlier tokens of its own sequences) and takes its depth as its position. Every sequence then
sees exactly what it would see alone, so its hidden states, and the loss, are those of separate
rows up to float rounding, while the shared tokens run (forward and backward) once.

The layout needs a custom attention mask, which only some attention implementations honour:
:func:`trees_are_exact` checks the model as it is, and the engine runs ordinary rows otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch

from .batching import StepItem, parrot_rows
from .inputs import KV, PrefixedRows, query_from

__all__ = ["Token", "Tree", "TreeRows", "build_tree", "group_trees", "item_tokens", "tree_rows",
           "trees_are_exact", "mask_dtype_for"]

# A token id, or a parrot row ``(parrot index, row)``.
Token = Union[int, tuple[int, int]]


@dataclass(frozen=True)
class Tree:
    """A trie of sequences in depth-first order.

    Attributes:
        tokens: ``[N]`` the token of each node.
        parent: ``[N]`` each node's parent (-1 for a root; a tree may have several roots).
        depth: ``[N]`` each node's position in its sequences (0 for a root).
        nodes: per sequence, the node of each of its tokens.
    """

    tokens: list[Token]
    parent: list[int]
    depth: list[int]
    nodes: list[list[int]]

    def __len__(self) -> int:
        return len(self.tokens)


def build_tree(seqs: Sequence[Sequence[Token]]) -> Tree:
    """The trie of ``seqs``: a token shares a node with another sequence's exactly when both
    sequences agree up to and including it. Nodes come in depth-first order (a parent before
    its children, each subtree contiguous), children in the order their sequences came."""
    children: list[dict[Token, int]] = [{}]  # trie node 0 is a virtual root
    token: list[Token] = [0]
    trie_nodes: list[list[int]] = []
    for seq in seqs:
        at, path = 0, []
        for t in seq:
            nxt = children[at].get(t)
            if nxt is None:
                nxt = len(token)
                children[at][t] = nxt
                children.append({})
                token.append(t)
            path.append(nxt)
            at = nxt
        trie_nodes.append(path)
    # Depth-first renumbering, iteratively (sequences are hundreds of tokens long).
    order, parent_of, depth_of = [], [], []
    column = [0] * len(token)
    stack = [(c, -1, 0) for c in reversed(children[0].values())]
    while stack:
        node, parent, depth = stack.pop()
        column[node] = len(order)
        order.append(node)
        parent_of.append(parent)
        depth_of.append(depth)
        stack.extend((c, column[node], depth + 1) for c in reversed(children[node].values()))
    return Tree(tokens=[token[n] for n in order], parent=parent_of, depth=depth_of,
                nodes=[[column[n] for n in path] for path in trie_nodes])


def _sort_key(seq: Sequence[Token]) -> list[tuple[int, ...]]:
    # Token ids before parrot rows; a plain int and a tuple do not compare.
    return [(1, *t) if isinstance(t, tuple) else (0, t) for t in seq]


def _common(a: Sequence[Token], b: Sequence[Token]) -> int:
    k, stop = 0, min(len(a), len(b))
    while k < stop and a[k] == b[k]:
        k += 1
    return k


def group_trees(seqs: Sequence[Sequence[Token]], min_share: int, max_nodes: int
                ) -> tuple[list[list[int]], list[int]]:
    """Which sequences share a tree row: in lexicographic order, a sequence joins the row of
    the one before it when they share at least ``min_share`` leading tokens and the row stays
    within ``max_nodes`` nodes (a longer row only wastes attention on masked pairs).

    Returns:
        The rows (indices into ``seqs``) and each row's nodes. In lexicographic order a trie's
        size is the sum of each sequence's length minus what it shares with the one before
        it, so the sizes are exact.
    """
    order = sorted(range(len(seqs)), key=lambda i: _sort_key(seqs[i]))
    groups: list[list[int]] = []
    sizes: list[int] = []
    prev: Sequence[Token] = ()
    for i in order:
        seq = seqs[i]
        share = _common(seq, prev) if groups else 0
        if groups and share >= min_share and sizes[-1] + len(seq) - share <= max_nodes:
            groups[-1].append(i)
            sizes[-1] += len(seq) - share
        else:
            groups.append([i])
            sizes.append(len(seq))
        prev = seq
    return groups, sizes


def item_tokens(item: StepItem, n_parrot: int, skip: int = 0) -> list[Token]:
    """The fast path's sequence of ``item`` (cut after its last supervised token's input row)
    as tree tokens, without its first ``skip`` prompt tokens (a prefix run apart)."""
    prompt = list(item.prompt)
    if item.splice >= 0 and n_parrot:
        s = item.splice
        seq: list[Token] = prompt[:s] + [(item.parrot, r) for r in range(n_parrot)] + prompt[s:]
    else:
        seq = prompt
    return seq[skip:] + list(item.labels[:-1])


def _supervised_nodes(item: StepItem, n_parrot: int, skip: int, nodes: list[int]) -> list[int]:
    """The nodes whose next token is one of ``item``'s labels, in label order."""
    m = n_parrot if item.splice >= 0 else 0
    first = len(item.prompt) + m - 1 - skip
    return nodes[first:first + len(item.labels)]


@dataclass(frozen=True)
class TreeRows(PrefixedRows):
    """:class:`~sande_fast.inputs.PrefixedRows` of right-padded tree rows.

    ``attention_mask`` is ``[B, 1, L, P+L]`` (``P``: the shared prefix's columns): boolean for
    SDPA, additive (0 / the dtype's minimum) for other attention implementations.
    ``supervised_rows`` and ``labels`` hold every term's rows, term after term.

    Attributes:
        sections: supervised rows of each term.
        term_items: each term's items in the order of its rows.
    """

    sections: tuple[int, ...] = ()
    term_items: tuple[tuple[StepItem, ...], ...] = ()


def tree_rows(trees: Sequence[Sequence[tuple[int, StepItem]]], n_terms: int,
              parrot: torch.Tensor | None, *, prefix_kv: KV | None, pad_id: int,
              device: torch.device, mask_dtype: torch.dtype | None,
              last_layer_tail: bool) -> TreeRows:
    """One micro-batch of tree rows.

    Args:
        trees: per row, its ``(term, item)`` pairs; every item's prompt starts with the shared
            prefix (when there is one) and its own sequence is built by :func:`item_tokens`.
        n_terms: how many terms the items belong to (``0 <= term < n_terms``).
        parrot: ``[n, H]``, a stack ``[K, n, H]`` (items name theirs), or None.
        prefix_kv: keys and values ``[1, kv_heads, P, head_dim]`` of a prompt prefix every item
            starts with (see :class:`~sande_fast.engine.SharedPrefix`), or None.
        mask_dtype: None for a boolean mask (SDPA), else the dtype of an additive mask.
        last_layer_tail: whether the last decoder layer may skip leading unsupervised columns.
    """
    n = parrot_rows(parrot)
    skip = prefix_kv[0][0].shape[2] if prefix_kv is not None else 0
    built = [build_tree([item_tokens(it, n, skip) for _, it in row]) for row in trees]
    width = max(len(t) for t in built)
    b = len(built)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    allowed = torch.zeros((b, width, skip + width), dtype=torch.bool)
    allowed[:, :, :skip] = True
    rows: list[list[int]] = [[] for _ in range(n_terms)]
    labels: list[list[int]] = [[] for _ in range(n_terms)]
    items: list[list[StepItem]] = [[] for _ in range(n_terms)]
    splice_rows, splice_parrots, first_sup = [], [], []
    for r, (tree, row) in enumerate(zip(built, trees)):
        size = len(tree)
        depth = torch.tensor(tree.depth)
        positions[r, :size] = skip + depth
        # pads repeat the last real position, so no position passes the context
        positions[r, size:] = skip + int(depth.max())
        mask = allowed[r, :, skip:]
        _ancestor_mask(tree, mask)
        for c, t in enumerate(tree.tokens):
            if isinstance(t, tuple):
                if t[1] == 0:
                    splice_rows.append(r * width + c)
                    splice_parrots.append(t[0])
            else:
                ids[r, c] = t
        for c in range(size, width):
            mask[c, c] = True  # a pad attends only to itself (no row of softmax is empty)
        sup = []
        for (term, it), nodes in zip(row, tree.nodes):
            cols = _supervised_nodes(it, n, skip, nodes)
            rows[term] += [r * width + c for c in cols]
            labels[term] += list(it.labels)
            items[term].append(it)
            sup.append(min(cols))
        first_sup.append(min(sup))
    spliced = None
    if splice_rows:
        if parrot is not None and parrot.dim() == 3:
            spliced = parrot[torch.tensor(splice_parrots, dtype=torch.long,
                                          device=parrot.device)]
        else:
            spliced = parrot
    mask4 = _as_attention_mask(allowed[:, None], mask_dtype)
    kv = None
    if prefix_kv is not None:
        kv = [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix_kv]
    return TreeRows(ids=ids.to(device),
                    supervised_rows=torch.tensor([x for part in rows for x in part],
                                                 dtype=torch.long, device=device),
                    labels=torch.tensor([x for part in labels for x in part], dtype=torch.long,
                                        device=device),
                    position_ids=positions.to(device), parrot=spliced,
                    splice_rows=(torch.tensor(splice_rows, dtype=torch.long, device=device)
                                 if splice_rows else None),
                    query_from=query_from(first_sup, last_layer_tail),
                    prefix_kv=kv, attention_mask=mask4.to(device),
                    sections=tuple(len(part) for part in rows),
                    term_items=tuple(tuple(part) for part in items))


def _ancestor_mask(tree: Tree, mask: torch.Tensor) -> None:
    """Sets ``mask[c, j]`` (a boolean ``[len(tree), >= len(tree)]`` view, all False) where node
    ``j`` is ``c`` or one of its ancestors: what node ``c`` attends to."""
    for c, p in enumerate(tree.parent):
        if p >= 0:
            mask[c] = mask[p]  # a parent comes first, so its row is already complete
        mask[c, c] = True


def _as_attention_mask(allowed: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``allowed`` as the model's attention takes a custom mask: itself for a boolean mask
    (``dtype`` None), else additive, 0 where allowed and the dtype's minimum elsewhere."""
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def mask_dtype_for(model: torch.nn.Module) -> torch.dtype | None:
    """The attention mask a custom 4D mask must be for ``model``: None (boolean) for SDPA, else
    an additive mask in the model's dtype."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl == "sdpa":
        return None
    return next(model.parameters()).dtype


@torch.no_grad()
def trees_are_exact(adapter: "ModelAdapter") -> bool:  # noqa: F821 (adapter imports inputs)
    """Whether the model honours a tree row's mask and positions: two sequences that share
    their first tokens are run as one tree row and one by one, and their hidden states
    compared. Attention implementations that ignore a custom 4D mask (flash-attn varlen, flex
    attention without a block mask) fail this and get ordinary rows."""
    from .adapter import eval_mode

    dev = adapter.device
    vocab = adapter.embed.weight.shape[0]
    a, b = [3, 5, 7, 11, 13], [3, 5, 17, 19]
    tree = build_tree([[t % vocab for t in a], [t % vocab for t in b]])
    ids = torch.tensor([tree.tokens], device=dev)
    allowed = torch.zeros((len(tree), len(tree)), dtype=torch.bool)
    _ancestor_mask(tree, allowed)
    mask = _as_attention_mask(allowed[None, None], mask_dtype_for(adapter.model))
    try:
        with eval_mode(adapter.model):
            ht = adapter.hidden_states(adapter.embed(ids),
                                       position_ids=torch.tensor([tree.depth], device=dev),
                                       attention_mask=mask.to(dev))
            refs = [adapter.hidden_states(adapter.embed(torch.tensor([[t % vocab for t in s]],
                                                                     device=dev)))
                    for s in (a, b)]
    except Exception:  # an architecture that refuses a custom mask or position ids this way
        return False
    got = torch.cat([ht[0, nodes] for nodes in tree.nodes]).float()
    ref = torch.cat([h[0] for h in refs]).float()
    tol = 1e-3 if ht.dtype == torch.float32 else 5e-2
    return bool(((got - ref).abs().max() <= tol * ref.abs().max().clamp_min(1.0)).item())
