"""Micro-batch planner: low-padding bucketing and flat index layouts for one model step.

Sequences are truncated by the caller after their last supervised token, so lengths vary a lot.
``plan_buckets`` groups them into micro-batches that waste little compute on padding and
``layout`` builds the flat index arrays (position ids, supervised rows, parrot splice rows) that
one micro-batch needs. The loops run in C++ (``sande_fast._planner``) with the
GIL released; this module converts inputs to contiguous int64 arrays and checks their structure.
Per-sequence value checks happen in C++ and raise ``ValueError`` naming the offending index.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
import numpy.typing as npt

from sande_fast import _planner

__all__ = ["Layout", "plan_buckets", "layout", "padding_waste"]

IntArrayLike = Union[Sequence[int], npt.NDArray[np.integer]]


def _as_int64_vector(values: IntArrayLike, name: str) -> npt.NDArray[np.int64]:
    """Converts integer input to a contiguous 1-D int64 array.

    Args:
        values: Sequence of Python ints or integer numpy array, shape [N].
        name: Argument name, used in error messages.

    Returns:
        Contiguous int64 array of shape [N] (no copy when already int64 and contiguous).

    Raises:
        ValueError: If the input is not 1-D, not integer-typed, or out of int64 range.
    """
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        # np.asarray([]) is float64; an empty input is still a valid empty integer vector.
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} has values beyond the int64 range")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _as_int(value: int, name: str) -> int:
    """Returns ``value`` as a Python int; rejects floats and bools with a ValueError."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def plan_buckets(
    lengths: IntArrayLike, token_budget: int, max_batch: int, max_waste: float = 1.0
) -> list[npt.NDArray[np.int64]]:
    """Groups sequence indices into micro-batches with little padding.

    Sequences are sorted by length (descending, stable: equal lengths keep input order) and
    appended greedily to the running batch while ``len(batch) * max_len_in_batch <= token_budget``
    and ``len(batch) <= max_batch`` and the batch's padding share
    ``1 - sum(lengths) / (len(batch) * max_len)`` stays ``<= max_waste``; otherwise a new batch
    starts. A sequence longer than the
    budget gets a batch of its own. Deterministic; every index appears exactly once.

    Args:
        lengths: Token count of each sequence, shape [N], every value >= 1.
        token_budget: Maximum padded rows (batch size times longest member) per batch, >= 1.
        max_batch: Maximum sequences per batch, >= 1.
        max_waste: Maximum share of padded rows per batch, in [0, 1] (1 disables the cap).

    Returns:
        Batches in plan order (longest first); each an int64 array of shape [B_k] of indices into
        ``lengths``, ordered by descending length. Empty list when N == 0.

    Raises:
        ValueError: On non-integer or non-1-D input, a length < 1, or budget/max_batch < 1.
    """
    lens = _as_int64_vector(lengths, "lengths")
    return list(
        _planner.plan_buckets(
            lens, _as_int(token_budget, "token_budget"), _as_int(max_batch, "max_batch"),
            _as_waste(max_waste),
        )
    )


def _as_waste(v: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ValueError(f"max_waste must be a number in [0, 1], got {v!r}")
    return float(v)


@dataclass(frozen=True)
class Layout:
    """Flat index arrays of one micro-batch of B sequences.

    Attributes:
        position_ids: int64 [rows of the flat view: ``B * padded_len`` or ``sum(lengths)``],
            0..len-1 within each sequence, 0 on padding rows.
        supervised_rows: int64 [sum(sup_len)], flat rows whose hidden states go to the LM head,
            in sequence order then row order.
        splice_rows: int64 [number of sequences with splice >= 0], flat row where each parrot
            starts, in sequence order.
    """

    position_ids: npt.NDArray[np.int64]
    supervised_rows: npt.NDArray[np.int64]
    splice_rows: npt.NDArray[np.int64]


def layout(
    lengths: IntArrayLike,
    splice: IntArrayLike,
    n_parrot: int,
    sup_start: IntArrayLike,
    sup_len: IntArrayLike,
    padded_len: int,
) -> Layout:
    """Builds the flat layout of one micro-batch (arrays given in the micro-batch's order).

    With ``padded_len > 0`` sequence b occupies rows ``b*padded_len .. b*padded_len+lengths[b]-1``
    of a [B*padded_len] view (right padding); with ``padded_len == 0`` sequences are packed back
    to back.

    Args:
        lengths: Token count per sequence (parrot rows included), shape [B], values >= 1.
        splice: Row where the parrot starts per sequence, or -1 for no parrot, shape [B];
            ``splice + n_parrot <= lengths`` is required.
        n_parrot: Rows in a parrot, >= 0 (>= 1 when any splice >= 0).
        sup_start: First supervised row per sequence, shape [B], >= 0.
        sup_len: Supervised rows per sequence, shape [B], >= 0;
            ``sup_start + sup_len <= lengths`` is required.
        padded_len: Row stride per sequence (>= every length), or 0 for packed mode.

    Returns:
        The micro-batch's ``Layout``.

    Raises:
        ValueError: On malformed input (shape mismatch, non-integer values, out-of-range splice
            or supervision span, length above ``padded_len``, more rows than int32 can index).
    """
    lens = _as_int64_vector(lengths, "lengths")
    spl = _as_int64_vector(splice, "splice")
    s0 = _as_int64_vector(sup_start, "sup_start")
    sl = _as_int64_vector(sup_len, "sup_len")
    for name, arr in (("splice", spl), ("sup_start", s0), ("sup_len", sl)):
        if arr.shape != lens.shape:
            raise ValueError(f"{name} has shape {arr.shape}, lengths has shape {lens.shape}")
    pos, sup_rows, spl_rows = _planner.layout(
        lens, spl, _as_int(n_parrot, "n_parrot"), s0, sl, _as_int(padded_len, "padded_len")
    )
    return Layout(position_ids=pos, supervised_rows=sup_rows, splice_rows=spl_rows)


def padding_waste(batches: Sequence[IntArrayLike], lengths: IntArrayLike) -> float:
    """Share of padded rows when each batch is right-padded to its longest member.

    Args:
        batches: Index arrays into ``lengths`` (e.g. from ``plan_buckets``), each shape [B_k].
        lengths: Token count per sequence, shape [N].

    Returns:
        ``padded_rows / allocated_rows`` in [0, 1); 0.0 when nothing is allocated.

    Raises:
        ValueError: On an index outside ``[0, N)`` or malformed input.
    """
    lens = _as_int64_vector(lengths, "lengths")
    allocated = 0
    used = 0
    for k, batch in enumerate(batches):
        idx = _as_int64_vector(batch, f"batches[{k}]")
        if idx.size == 0:
            continue
        if int(idx.min()) < 0 or int(idx.max()) >= lens.size:
            raise ValueError(f"batches[{k}] has an index outside [0, {lens.size})")
        member = lens[idx]
        allocated += int(member.max()) * idx.size
        used += int(member.sum())
    return 0.0 if allocated == 0 else (allocated - used) / allocated
