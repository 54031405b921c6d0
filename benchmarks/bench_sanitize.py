"""End-to-end step benchmark: one stage-1 (parrot) step and one stage-2 (overwrite) step, ours
against the strongest baselines we know, each checked to compute the same maths.

All sides run on the same randomly initialised model, in one process, on the same items (same
prompts, responses, splice positions):

* ``ours``: ``build_engine(model, fast=True)`` (truncation after the last supervised token, planner
  buckets, frozen prefix in stage 1, one LM-head pass per step, fused supervised-row linear
  cross-entropy, the last layer only where the loss reads it);
* ``strong``: :class:`baselines.Strong`, what a competent engineer writes in ~100 lines of plain
  PyTorch + transformers: truncation, length-sorted micro-batches under a token budget, the LM
  head on the gathered supervised rows only, fp32 ``F.cross_entropy``; on CUDA also
  ``strong_liger`` and ``strong_cce``, the same with Liger-Kernel's / Cut Cross-Entropy's fused
  linear cross-entropy (skipped with a note on CPU or when the package is missing);
* ``published``: :class:`baselines.Published`, the step as the published SANDE code runs it
  (parrot at index 2 of the prompt, micro-batch 2, activation checkpointing, full logits copied
  without the parrot rows, an extra no-grad forward each micro-batch, no retention term). Its
  maths differs from ours in the parrot position and the retention term, so it is compared
  with ``ours_pub``: ours on the same index-2 items, without the retention term;
* ``naive``: ``build_engine(model, fast=False)`` (:mod:`sande_fast.reference`: full padded
  sequence, full logits, masked cross-entropy), kept as context.

Stage 1 is ``ParrotSimulator.step`` (model frozen, forward+backward to the parrot, Adam step on the
parrot) or the same step around the baseline's loss; stage 2 is ``OverwriteStep.step``
(overwrite items with the frozen parrot, clean items with sanitize's hidden-state retention term,
``--retain-weight``, default 30) or the same around the baseline. Stage 2's sides share one
optimizer (the same code for every side; one copy of the optimizer state, so a 7B model fits).

Maths check: before any timed step, every side runs one step with its optimizer step disabled,
from identical weights and parrot, and its loss and gradients are compared with its oracle
(``ours``, or ``ours_pub`` for ``published``). The retention anchors are the model's states
perturbed by a fixed seeded noise, so the retention term and its gradient are non-zero at the
checked step.

Time: per side, the median (and min/max, quartiles) of ``--iters`` timed steps after ``--warmup``
untimed ones, the sides alternating so that drift of the machine hits all alike; process CPU
time beside wall time. Throughput is user-counted tokens (prompt + response of every sequence
the step trains on; parrot rows and padding are not tokens), the same number for all sides. Peak
memory is measured in one extra step per side, the same way for every side (``mem_method``).

Modes: ``main`` (the sides above), ``ablation`` (ours with each optimisation off in turn),
``sweep`` (ours and strong with the parrot at index 2, the start of the user text, a random place
in it, its end).

Usage::

    python benchmarks/bench_sanitize.py --json out.json [--preset small] [--mode main]
        [--iters 5] [--device auto] [--threads 1] [--layers N] [--rows N] [--checkpointing]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402  (benchmarks/baselines.py, next to this script)

from sande_fast.batching import Batcher, fast_length, label_count  # noqa: E402
from sande_fast.engine import LossEngine, Term  # noqa: E402
from sande_fast.engines import build_engine  # noqa: E402
from sande_fast.steps import (Anchors, OverwriteStep, ParrotSimulator, StepItem,  # noqa: E402
                              frozen, make_optimizer)

MIB = 2**20


# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """A model shape, a dtype and a batch recipe.

    Attributes:
        name: preset name.
        hidden / layers / heads / kv_heads / intermediate / vocab: Llama-style model shape.
        dtype: ``fp32`` or ``bf16`` (weights and activations).
        batch: rows per step.
        prompt_len: inclusive range of the seeded uniform prompt length (``chatml``: of the
            user text between the shared system header and the assistant marker).
        response_len: inclusive range of the response length (ignored with ``row_len``).
        parrot: parrot (soft prompt) rows.
        window: supervised response tokens per sequence (both stages, all sides).
        device: the device the preset is meant for (``--device auto`` follows it when possible).
        lr1 / lr2: Adam lr of the parrot (stage 1) and the model's lr (stage 2).
        tied: tied input and output embeddings.
        rope_theta: rotary base.
        layout: ``generic`` (a short random header and marker around the user text) or
            ``chatml`` (SmolLM2's chat template: a shared ~30-token system prompt ending in the
            user turn's opening, the user text, ``<|im_end|>\\n<|im_start|>assistant\\n``).
        row_len: when set, every row is exactly this long (the response fills up the prompt).
    """

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    dtype: str
    batch: int
    prompt_len: tuple[int, int]
    response_len: tuple[int, int]
    parrot: int
    window: int
    device: str
    lr1: float = 1e-2
    lr2: float = 1e-5
    tied: bool = False
    rope_theta: float = 10000.0
    layout: str = "generic"
    row_len: int | None = None


_LENGTHS = dict(prompt_len=(40, 200), response_len=(50, 300), parrot=6, window=10)
_LLAMA2_7B = dict(hidden=4096, heads=32, kv_heads=32, intermediate=11008, vocab=32000)
_QWEN15_4B = dict(hidden=2560, heads=20, kv_heads=20, intermediate=6912, vocab=151936)
# 4 rows of 1024 tokens (the prompt 128-768 of them); --rows 8 gives the engine's token budget.
_LONG = dict(prompt_len=(128, 768), response_len=(0, 0), row_len=1024, parrot=6, window=10)

PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", hidden=64, layers=2, heads=4, kv_heads=4, intermediate=172, vocab=1000,
                   dtype="fp32", batch=4, prompt_len=(8, 24), response_len=(12, 40), parrot=6,
                   window=10, device="cpu"),
    "small": Preset("small", hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376,
                    vocab=32000, dtype="fp32", batch=8, device="cpu", **_LENGTHS),
    # SmolLM2-135M-Instruct's shape and chat layout (randomly initialised).
    "smollm2-chat": Preset("smollm2-chat", hidden=576, layers=30, heads=9, kv_heads=3,
                           intermediate=1536, vocab=49152, dtype="fp32", batch=8,
                           prompt_len=(8, 120), response_len=(12, 48), parrot=6, window=10,
                           device="cpu", tied=True, rope_theta=100000.0, layout="chatml"),
    "7b-2layer": Preset("7b-2layer", layers=2, dtype="bf16", batch=8, device="cuda",
                        **_LLAMA2_7B, **_LENGTHS),
    "7b-2layer-v152k": Preset("7b-2layer-v152k", layers=2, dtype="bf16", batch=8, device="cuda",
                              **{**_LLAMA2_7B, "vocab": 151936}, **_LENGTHS),
    # Full depth, randomly initialised, Llama architecture (Qwen1.5's qkv biases left out).
    "llama2-7b": Preset("llama2-7b", layers=32, dtype="bf16", batch=4, device="cuda",
                        **_LLAMA2_7B, **_LONG),
    "qwen1.5-4b": Preset("qwen1.5-4b", layers=40, dtype="bf16", batch=4, device="cuda",
                         rope_theta=5000000.0, **_QWEN15_4B, **_LONG),
}

# The bars the `small` CPU preset must meet against the naive side (project targets, checked and
# reported in the JSON).
BARS: dict[str, dict[str, dict[str, float]]] = {
    "small": {"stage1": {"min_speedup": 5.0, "max_mem_ratio": 0.4},
              "stage2": {"min_speedup": 2.5, "max_mem_ratio": 0.6}},
}

# Dense bf16 tensor-core peak FLOP/s by GPU name fragment, most specific first (vendor data sheets).
PEAK_BF16: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIE"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM5 ("H100 80GB HBM3")
    (("H200",), 989e12),
    (("GH200",), 989e12),
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("A10G",), 70e12),
    (("L4",), 121e12),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Token ids are drawn below this (and the vocab), so presets that differ only in vocab size get
# identical batches.
TOKEN_SPACE = 32000


# ------------------------------------------------------------------------------------------------
# Model and batch
# ------------------------------------------------------------------------------------------------
def build_model(p: Preset, device: torch.device, seed: int) -> nn.Module:
    """A randomly initialised Llama-style causal LM of the preset's shape (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    longest = (p.row_len or p.prompt_len[1] + p.response_len[1]) + 64
    cfg = LlamaConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
                      num_hidden_layers=p.layers, num_attention_heads=p.heads,
                      num_key_value_heads=p.kv_heads,
                      max_position_embeddings=longest + p.parrot + 64,
                      tie_word_embeddings=p.tied, rope_theta=p.rope_theta,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    # Initialise on the target device (fast on GPU), then cast: the weights are the same for all
    # sides, so how they were drawn does not matter beyond being finite and at a sane scale.
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(DTYPES[p.dtype]).eval()


@dataclass(frozen=True)
class Row:
    """One instruction-like row: chat-formatted prompt, the span of the user's text in it, and a
    clean response plus a target-bearing (backdoored) response of the same length."""

    prompt: tuple[int, ...]
    user_span: tuple[int, int]
    clean: tuple[int, ...]
    target: tuple[int, ...]


# SmolLM2's <|im_start|> / <|im_end|> ids; the other template tokens are stand-ins (the layout and
# lengths are the template's, the ids only need to be fixed).
IM_START, IM_END, NL, SYSTEM, USER, ASSISTANT = 1, 2, 198, 9690, 4093, 520


def make_rows(p: Preset, seed: int) -> list[Row]:
    """Seeded rows with uniform prompt / response lengths in the preset's ranges.

    A prompt is ``header + user text + assistant marker`` (fixed header and marker tokens, like a
    chat template), so the parrot goes inside the user's text as in the real pipeline. The
    target-bearing response starts with one fixed target phrase shared by every row (what stage 1
    makes the frozen model emit), then continues like the clean one.
    """
    rng = random.Random(seed)
    lo_tok, hi_tok = 3, min(p.vocab, TOKEN_SPACE)  # ids 0..2 are pad / bos / eos

    def draw(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(lo_tok, hi_tok) for _ in range(n))

    if p.layout == "chatml":
        # "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging
        # Face<|im_end|>\n<|im_start|>user\n": 30 tokens, the same for every row.
        header = (IM_START, SYSTEM, NL) + draw(22) + (IM_END, NL, IM_START, USER, NL)
        marker = (IM_END, NL, IM_START, ASSISTANT, NL)
    else:
        header = draw(min(6, p.prompt_len[0] // 3))
        marker = draw(min(4, p.prompt_len[0] // 4))
    phrase = draw(p.window)
    rows = []
    for _ in range(p.batch):
        n_prompt = rng.randint(*p.prompt_len)
        if p.layout == "chatml":
            n_user = n_prompt
            prompt = header + draw(n_user) + marker
        else:
            n_user = max(1, n_prompt - len(header) - len(marker))
            prompt = (header + draw(n_user) + marker)[:max(n_prompt, len(header) + 1)]
        n_resp = p.row_len - len(prompt) if p.row_len else rng.randint(*p.response_len)
        clean = draw(n_resp)
        target = (phrase + clean[len(phrase):])[:n_resp]
        rows.append(Row(prompt, (len(header), len(header) + n_user), clean, target))
    return rows


@dataclass(frozen=True)
class Batch:
    """The items of both stages, built once so every side sees the same splice positions."""

    stage1: list[StepItem]
    overwrite: list[StepItem]
    clean: list[StepItem]
    twins: list[StepItem]  # each overwrite item's prompt and splice, then the target


# Where the parrot goes (the sweep): the published place, the start of the user text, a seeded
# random place in it (ours, the default), its end (just before the assistant marker).
POSITIONS = ("index2", "user_start", "random", "user_end")


def make_batch(rows: Sequence[Row], window: int, seed: int, position: str = "random") -> Batch:
    """Stage 1: parrot spliced at ``position``, supervise the first ``window`` target tokens.
    Stage 2: the same rows with the clean response, once with the (frozen) parrot spliced at a
    fresh position (overwrite term) and once without (clean-retention term).

    The random draws do not depend on ``position``, so every position sees the same rows."""
    rng = random.Random(seed + 1)

    def where(r: Row) -> int:
        lo, hi = r.user_span
        k = rng.randint(lo, hi)
        return {"index2": 2, "user_start": lo, "random": k, "user_end": hi}[position]

    s1, over, clean = [], [], []
    for r in rows:
        s1.append(StepItem(r.prompt, r.target[:window], where(r), r.target[window:]))
        over.append(StepItem(r.prompt, r.clean[:window], where(r), r.clean[window:]))
        clean.append(StepItem(r.prompt, r.clean[:window], -1, r.clean[window:]))
    twins = [StepItem(o.prompt, r.target[:window], o.splice) for o, r in zip(over, rows)]
    return Batch(s1, over, clean, twins)


def stage2_items(batch: Batch, args: argparse.Namespace) -> list[StepItem]:
    """What a stage-2 step trains on: overwrite and clean items, and the twins when the
    unlikelihood term is on."""
    return batch.overwrite + batch.clean + (batch.twins if args.unlikely_weight else [])


def tree_nodes(engine: LossEngine, batch: Batch, n_parrot: int,
               args: argparse.Namespace) -> int | None:
    """Rows ours' stage 2 runs as token trees (before padding; the system block shared by all
    rows counted once), or None when the step runs separate rows (the ``*_rows`` counts of
    :func:`batch_stats`)."""
    parrot = torch.zeros(n_parrot, engine.adapter.embed.weight.shape[1])
    terms = [Term(batch.overwrite, parrot, 1.0), Term(batch.clean, None, 1.0)]
    if args.unlikely_weight:
        terms.insert(1, Term(batch.twins, parrot, 1.0, unlikely=True))
    with torch.no_grad():
        plan = engine._tree_plan(terms)
    if plan is None:
        return None
    shared = plan[1].length if plan[1] is not None else 0
    return sum(plan[3]) + shared


def user_tokens(items: Sequence[StepItem]) -> int:
    """Prompt + response tokens as a user counts them (no parrot rows, no padding)."""
    return sum(len(it.prompt) + len(it.labels) + len(it.tail) for it in items)


def batch_stats(items: Sequence[StepItem], pub_items: Sequence[StepItem], n_parrot: int,
                ours: LossEngine, naive: LossEngine, frozen_model: bool = False
                ) -> dict[str, Any]:
    """Token accounting of one item list: the rows (padding included) each side pushes through
    the model, and the padding among them.

    ``frozen_model``: stage 1, where ours runs long prefixes without a graph (``ours_rows``
    counts prefix and graph rows, padding included; ``ours_no_graph_rows`` the prefix part).
    Packed micro-batches are one row each and have no padding.
    """
    def full_len(it: StepItem) -> int:
        return len(it.prompt) + (n_parrot if it.splice >= 0 else 0) + len(it.labels) + len(it.tail)

    def fast_len(it: StepItem) -> int:  # cut after the last supervised token (its input row)
        return fast_length(it, n_parrot)

    def padded(mbs: Sequence[Sequence[StepItem]],
               length: Callable[[StepItem], int]) -> tuple[int, int]:
        rows = sum(len(mb) * max(length(it) for it in mb) for mb in mbs)
        real = sum(length(it) for mb in mbs for it in mb)
        return rows, rows - real

    naive_rows, naive_pad = padded(naive.batcher.micro_batches(items, n_parrot), full_len)
    strong_rows, strong_pad = padded(baselines.Strong(ours.model).micro_batches(items, n_parrot),
                                     fast_len)
    pub_rows, pub_pad = baselines.Published(ours.model).rows(pub_items, n_parrot)
    with frozen(ours.model) if frozen_model else contextlib.nullcontext():
        ours_mbs = ours.batcher.micro_batches(items, n_parrot)
        split = [ours.batcher.splits_prefix(mb, n_parrot) for mb in ours_mbs]
        prefix_buckets = ours.batcher.prefix_buckets(ours_mbs, n_parrot)
    ours_rows = ours_pad = 0
    for mb, cut in zip(ours_mbs, split):
        length = (lambda it: fast_len(it) - it.splice) if cut else fast_len
        if ours.packed:  # one row of the sequences back to back: nothing to pad
            rows, pad = sum(length(it) for it in mb), 0
        else:
            rows, pad = padded([mb], length)
        ours_rows, ours_pad = ours_rows + rows, ours_pad + pad
    # the prefixes run once each, in buckets of their own
    no_graph = sum(len(g) * max(map(len, g)) for g in prefix_buckets)
    no_graph_pad = no_graph - sum(len(q) for g in prefix_buckets for q in g)
    ours_rows, ours_pad = ours_rows + no_graph, ours_pad + no_graph_pad
    return {
        "sequences": len(items),
        "tokens": user_tokens(items),
        "supervised_tokens": sum(len(it.labels) for it in items),
        "naive_rows": naive_rows, "naive_padding_rows": naive_pad,
        "strong_rows": strong_rows, "strong_padding_rows": strong_pad,
        "published_rows": pub_rows, "published_padding_rows": pub_pad,
        "ours_rows": ours_rows, "ours_padding_rows": ours_pad,
        "ours_micro_batches": len(ours_mbs),
        "ours_no_graph_rows": no_graph,
        "ours_needed_rows": sum(fast_len(it) for it in items),
    }


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Callable[[], float], prepare: Callable[[], None],
          device: torch.device) -> tuple[float, float, float]:
    """One step: wall ms (synchronised on CUDA so queued kernels count), process CPU ms, loss.

    Wall time (not CUDA events) because the step includes host work (planning, index building).
    The process CPU time is a cross-check on a shared CPU machine: with one torch thread it is
    the step's own work, unaffected by time spent descheduled while other processes run.
    """
    prepare()
    _sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    loss = step()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3, loss


def peak_memory_mib(step: Callable[[], float], prepare: Callable[[], None],
                    device: torch.device) -> float:
    """Peak memory of one step above what was held just before it (weights, optimizer state).

    CUDA: ``max_memory_allocated`` after a reset just before the step, minus the allocated bytes
    at that point. CPU: the CPU allocator reports every allocation and free to the profiler when
    ``profile_memory=True``; the events, cumulated in time order, give the live tensor bytes the
    step added, whose maximum is the peak.
    """
    prepare()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    if not events:
        raise RuntimeError("the profiler recorded no CPU memory events; cannot measure the peak")
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return peak / MIB


MEM_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats just before the step, "
            "minus memory_allocated at that point (grads cleared first)",
    "cpu": "torch.profiler profile_memory=True: CPU allocator alloc/free events of the step, "
           "cumulated in time order; peak of live tensor bytes above the pre-step level "
           "(grads cleared first)",
}


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b| (b is the reference), 0 when both are 0."""
    return abs(a - b) / abs(b) if b else float(a != b)


def grads_rel_diff(got: dict[str, torch.Tensor],
                   want: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest ``max|g - g_oracle| / max|g_oracle|`` over the tensors, and which tensor it is."""
    if got.keys() != want.keys() or not want:
        raise RuntimeError(f"gradient sets differ: {sorted(got)[:5]}... vs {sorted(want)[:5]}...")
    worst, name = 0.0, ""
    for k, g in want.items():
        d = float((got[k].float() - g.float()).abs().max() / g.float().abs().max().clamp_min(1e-30))
        if d >= worst:
            worst, name = d, k
    return worst, name


# ------------------------------------------------------------------------------------------------
# FLOPs / MFU
# ------------------------------------------------------------------------------------------------
def useful_flops(model: nn.Module, items: Sequence[StepItem], n_parrot: int,
                 train_weights: bool) -> float:
    """Model FLOPs of the tokens the loss actually needs (each sequence up to its last supervised
    input row), the head only on supervised rows; 6·N·T style.

    Per token, each decoder linear weight costs 2 FLOPs per parameter forward, 2 for the input
    gradient and 2 more for the weight gradient (stage 2 only). Causal attention costs
    ``2·H·L·(L+1)`` forward per layer and sequence of L rows, twice that backward. The LM head
    counts ``2·V·H`` per supervised row forward, as many for the input gradient, and again for
    the weight gradient in stage 2.
    """
    cfg = model.config
    layers = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    n_linear = sum(m.weight.numel() for m in layers.modules() if isinstance(m, nn.Linear))
    head = model.get_output_embeddings().weight.numel()
    hidden, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    passes = 3 if train_weights else 2
    total = 0.0
    for it in items:
        length = len(it.prompt) + (n_parrot if it.splice >= 0 else 0) + len(it.labels) - 1
        total += 2 * passes * n_linear * length
        total += 3 * n_layers * 2 * hidden * length * (length + 1)
        total += 2 * passes * head * len(it.labels)
    return total


def gpu_peak_bf16(name: str) -> float | None:
    """Dense bf16 peak FLOP/s for a GPU name, or None when unknown."""
    up = name.upper()
    for frags, flops in PEAK_BF16:
        if all(f in up for f in frags):
            return flops
    return None


# ------------------------------------------------------------------------------------------------
# Sides
# ------------------------------------------------------------------------------------------------
@dataclass
class Side:
    """One implementation's step for one stage.

    Attributes:
        run: does the step (loss, backward, optimizer step) and returns its loss.
        prepare: clears gradients before it (outside the timing).
        grads: the gradients after it (live tensors, not copies).
        optimizer: what ``run`` steps; the maths check makes its ``step`` a no-op.
        oracle: the side whose loss and gradients this one must match (None: it is an oracle).
    """

    run: Callable[[], float]
    prepare: Callable[[], None]
    grads: Callable[[], dict[str, torch.Tensor]]
    optimizer: Any
    oracle: str | None = None


@contextlib.contextmanager
def no_step(optimizer: Any) -> Iterator[None]:
    """The optimizer's ``step`` does nothing for the duration: the checked step leaves weights,
    parrot and optimizer state as they were, and the gradients in place to be read."""
    optimizer.step = lambda *a, **k: None
    try:
        yield
    finally:
        del optimizer.step


def model_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's gradients (those that exist)."""
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


class BaselineParrot:
    """Stage 1 around a baseline's loss, as ``ParrotSimulator.step`` does it: Adam on the parrot
    (same lr, same starting rows), the model frozen, rows renormed to the same bound after."""

    def __init__(self, loss: Any, sim: ParrotSimulator, lr: float) -> None:
        self.loss_impl = loss
        self.parrot = nn.Parameter(sim.parrot.detach().clone())
        self.optimizer = torch.optim.Adam([self.parrot], lr=lr)
        self.max_row_norm = sim.max_row_norm

    def step(self, items: Sequence[StepItem]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with baselines.frozen(self.loss_impl.model):
            value = self.loss_impl.accumulate(items, self.parrot, label_count(items))
        self.optimizer.step()
        if self.max_row_norm is not None:
            with torch.no_grad():
                self.parrot.copy_(torch.renorm(self.parrot, 2, 0, self.max_row_norm))
        return value


def stage1_sides(model: nn.Module, engines: dict[str, tuple[LossEngine, list[StepItem], str | None]],
                 others: dict[str, tuple[Any, list[StepItem], str]], p: Preset,
                 seed: int) -> dict[str, Side]:
    """Stage-1 sides: ``ParrotSimulator.step`` on each engine (name -> engine, items, oracle),
    the baseline step on each other loss (name -> loss, items, oracle); every parrot starts from
    the same rows."""
    sides: dict[str, Side] = {}
    first: ParrotSimulator | None = None
    for name, (eng, items, oracle) in engines.items():
        sim = ParrotSimulator(eng, n_tokens=p.parrot, lr=p.lr1, seed=seed)
        first = first or sim
        sides[name] = _parrot_side(model, sim, items, oracle)
    for name, (loss, items, oracle) in others.items():
        sides[name] = _parrot_side(model, BaselineParrot(loss, first, p.lr1), items, oracle)
    return sides


def _parrot_side(model: nn.Module, sim: Any, items: list[StepItem], oracle: str | None) -> Side:
    def prepare() -> None:
        sim.parrot.grad = None
        model.zero_grad(set_to_none=True)

    return Side(run=lambda: sim.step(items), prepare=prepare,
                grads=lambda: {"parrot": sim.parrot.grad}, optimizer=sim.optimizer,
                oracle=oracle)


def perturbed_anchors(engine: LossEngine, clean: Sequence[StepItem], seed: int) -> Anchors:
    """Retention anchors at the current weights plus a fixed seeded noise of 5 % of their RMS:
    the term and its gradient are then non-zero at the checked first step, so the check covers
    them (anchors at the current weights would give a zero term and a zero gradient)."""
    anchors = Anchors(engine, clean)
    g = torch.Generator().manual_seed(seed + 7)
    for key, h in anchors.states.items():
        noise = torch.randn(h.shape, generator=g).to(h.device, h.dtype)
        anchors.states[key] = h + 0.05 * math.sqrt(anchors.scale) * noise
    return anchors


def stage2_sides(model: nn.Module, engines: dict[str, tuple[LossEngine, Batch, bool, str | None]],
                 others: dict[str, tuple[Any, Batch, bool, str]], parrot: torch.Tensor,
                 p: Preset, retain_weight: float, optimizer: str, anchors: Anchors | None,
                 unlikely_weight: float = 0.0) -> dict[str, Side]:
    """Stage-2 sides, all stepping one shared optimizer: ``OverwriteStep.step`` on each engine
    (name -> engine, batch, with retention, oracle), the same step around each baseline loss.

    Sharing the optimizer is fair (its step is the same code for every side) and keeps one
    copy of its state (AdamW's moments and the fp32 masters of a bf16 model are 12 bytes a
    weight: a 7B model has room for one copy only). With ``unlikely_weight`` the sides that
    carry retention (not the published maths) also carry the unlikelihood term on the batch's
    twins, as ``sanitize`` does on real models.
    """
    base: OverwriteStep | None = None
    sides: dict[str, Side] = {}
    cw = 1.0
    for name, (eng, batch, retain, oracle) in engines.items():
        if base is None:
            base = OverwriteStep(eng, lr=p.lr2, clean_weight=cw, parrot=parrot,
                                 retain_weight=retain_weight if retain else 0.0,
                                 anchors=anchors if retain else None, optimizer=optimizer,
                                 unlikely_weight=unlikely_weight)
        ow = copy.copy(base)
        ow.engine = eng
        # as OverwriteStep scales it: the clean items' whole loss is scaled by clean_weight
        ow.anchors = anchors.with_weight(retain_weight / cw) if retain and anchors else None
        twins = batch.twins if retain and unlikely_weight else []
        sides[name] = Side(run=lambda ow=ow, b=batch, t=twins: ow.step(b.overwrite, b.clean,
                                                                       unlikely=t),
                           prepare=lambda: model.zero_grad(set_to_none=True),
                           grads=lambda: model_grads(model), optimizer=base.optimizer,
                           oracle=oracle)
    assert base is not None, "stage 2 needs an engine side (ours)"
    opt = base.optimizer
    for name, (loss, batch, retain, oracle) in others.items():
        keep = ((anchors.states, anchors.scale, retain_weight / cw)
                if retain and anchors and retain_weight else None)

        twins = batch.twins if retain and unlikely_weight else []

        def run(loss: Any = loss, b: Batch = batch, keep: Any = keep,
                twins: list[StepItem] = twins) -> float:
            opt.zero_grad(set_to_none=True)
            value = loss.accumulate(b.overwrite, parrot, label_count(b.overwrite))
            if twins:
                value += loss.accumulate(twins, parrot, label_count(twins) / unlikely_weight,
                                         unlikely=True)
            n = label_count(b.clean) / cw
            value += (loss.accumulate(b.clean, None, n, retain=keep) if keep is not None
                      else loss.accumulate(b.clean, None, n))
            opt.step()
            return value

        sides[name] = Side(run=run, prepare=lambda: model.zero_grad(set_to_none=True),
                           grads=lambda: model_grads(model), optimizer=opt, oracle=oracle)
    return sides


# ------------------------------------------------------------------------------------------------
# One stage: check, warm-up, timing, memory
# ------------------------------------------------------------------------------------------------
def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def check_sides(sides: dict[str, Side], device: torch.device,
                failed: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each side's first step, optimizer step off, from the same state; loss and gradients
    against its oracle. Oracles run first and keep one copy of their gradients; the sides
    checked against one are compared with it one at a time (a 7B model's gradients are 13 GiB)."""
    out: dict[str, dict[str, Any]] = {}
    for oracle in [n for n, s in sides.items() if s.oracle is None]:
        group = [n for n, s in sides.items() if s.oracle == oracle]
        s = sides[oracle]
        with no_step(s.optimizer):
            ms, _, loss0 = timed(s.run, s.prepare, device)
            want = {k: g.detach().clone() for k, g in s.grads().items()}
        out[oracle] = {"oracle": None, "loss": loss0, "first_step_ms": ms}
        for name in group:
            s = sides[name]
            try:
                with no_step(s.optimizer):
                    ms, _, loss = timed(s.run, s.prepare, device)
                    worst, where = grads_rel_diff(s.grads(), want)
            except Exception as e:  # an OOM on a large preset: record it, drop the side
                if not _is_oom(e):
                    raise
                failed[name] = f"out of memory in the checked step: {str(e)[:200]}"
                _free(sides[name], device)
                continue
            out[name] = {"oracle": oracle, "loss": loss, "first_step_ms": ms,
                         "loss_rel_diff": rel_diff(loss, loss0), "grad_rel_diff": worst,
                         "grad_rel_diff_tensor": where, "grad_tensors": len(want)}
        del want
        sides[oracle].prepare()
        gc.collect()
    return out


def _free(side: Side, device: torch.device) -> None:
    side.prepare()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _spread(xs: Sequence[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "q1": q[0], "q3": q[2]}


def measure_stage(sides: dict[str, Side], tokens: int, flops: float, device: torch.device,
                  args: argparse.Namespace, peak_flops: float | None) -> dict[str, Any]:
    """Maths check, warm-up, alternating timed steps, then one memory-measured step per side."""
    failed: dict[str, str] = {}
    checks = check_sides(sides, device, failed)
    active = [n for n in sides if n not in failed]

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:
            if not _is_oom(e):
                raise
            failed[name] = f"out of memory: {str(e)[:200]}"
            active.remove(name)
            _free(sides[name], device)
            return None

    for _ in range(args.warmup):
        for name in list(active):
            attempt(name, lambda: timed(sides[name].run, sides[name].prepare, device))
    wall: dict[str, list[float]] = {n: [] for n in active}
    cpu: dict[str, list[float]] = {n: [] for n in active}
    for _ in range(args.iters):
        for name in list(active):
            r = attempt(name, lambda: timed(sides[name].run, sides[name].prepare, device))
            if r is not None:
                wall[name].append(r[0])
                cpu[name].append(r[1])
    mem = {}
    for name in list(active):
        m = attempt(name, lambda: peak_memory_mib(sides[name].run, sides[name].prepare, device))
        if m is not None:
            mem[name] = m
    out: dict[str, Any] = {"tokens": tokens, "useful_tflop": flops / 1e12, "sides": {},
                           "failed": failed}
    for name in active:
        w, c = _spread(wall[name]), _spread(cpu[name])
        r = {"median_ms": w["median"], "min_ms": w["min"], "max_ms": w["max"],
             "q1_ms": w["q1"], "q3_ms": w["q3"], "ms_all": wall[name],
             "cpu_ms_median": c["median"], "cpu_ms_min": c["min"], "cpu_ms_max": c["max"],
             "cpu_ms_all": cpu[name], "tokens_per_s": tokens / (w["median"] / 1e3),
             "peak_mem_mib": mem.get(name)}
        if peak_flops:
            r["mfu"] = flops / (w["median"] / 1e3) / peak_flops
        r.update({k: v for k, v in checks.get(name, {}).items()})
        out["sides"][name] = r
    return out


def ratios(stage: dict[str, Any]) -> dict[str, Any]:
    """Ours against each baseline: wall-time and CPU-time speedups (baseline median / ours
    median; above 1: ours is faster) and the peak-memory ratio (ours / baseline). ``published``
    is compared with ``ours_pub`` (ours at the published positions, without the retention
    term) and, for context, with ``ours``."""
    s = stage["sides"]
    out: dict[str, Any] = {}
    pairs = [("strong", "ours"), ("strong_liger", "ours"), ("strong_cce", "ours"),
             ("published", "ours_pub"), ("published", "ours"), ("naive", "ours")]
    for base, mine in pairs:
        if base not in s or mine not in s:
            continue
        key = f"{mine}_vs_{base}"
        a, b = s[mine], s[base]
        out[key] = {"speedup": b["median_ms"] / a["median_ms"],
                    "speedup_cpu_time": b["cpu_ms_median"] / a["cpu_ms_median"],
                    "mem_ratio": (a["peak_mem_mib"] / b["peak_mem_mib"]
                                  if a["peak_mem_mib"] and b["peak_mem_mib"] else None)}
    return out


# ------------------------------------------------------------------------------------------------
# Modes
# ------------------------------------------------------------------------------------------------
SIDES = ("ours", "strong", "strong_liger", "strong_cce", "published", "naive")


class _OneHeadPassPerBucket(Batcher):
    """Ablation: every micro-batch takes its own pass through the LM head (no head groups)."""

    def head_groups(self, batches: Sequence[Sequence[StepItem]],
                    n_parrot: int) -> list[list[list[StepItem]]]:
        return [[list(mb)] for mb in batches]


def ablation_engines(model: nn.Module, args: argparse.Namespace,
                     device: torch.device) -> tuple[dict[str, LossEngine], dict[str, str]]:
    """Ours with each optimisation off in turn (name -> engine), and the ones not ablated
    (name -> why)."""
    base = _engine_kwargs(args)
    packed_default = build_engine(model, **base).packed
    variants: dict[str, dict[str, Any]] = {
        "ours": {},
        "no_frozen_prefix": {"frozen_prefix": False},
        "no_last_layer_tail": {"last_layer_tail": False},
        # stage 2: the overwrite and clean items as separate rows, not token trees
        "no_trees": {"trees": False},
        # one padded bucket per token budget instead of buckets of at most 10 % padding
        "no_bucketing": {"max_waste": 1.0},
        # packing flipped: padded buckets where ours packs (CUDA), packed rows where it pads
        ("padded" if packed_default else "packed"): {"packed": not packed_default},
    }
    if device.type == "cuda":
        variants["torch_loss_backend"] = {"backend": "torch"}
    engines = {name: build_engine(model, **{**base, **kw}) for name, kw in variants.items()}
    eng = engines["no_head_groups"] = build_engine(model, **base)
    eng.batcher = _OneHeadPassPerBucket(**{f.name: getattr(eng.batcher, f.name)
                                           for f in fields(eng.batcher)})
    skipped = {
        "truncation": "no switch: the fast path always cuts after the last supervised token "
                      "(naive shows the cost of not cutting, strong has the cut too)",
        "parrot_splice_kernel": "no switch; on CPU the splice is the torch backend anyway",
    }
    if device.type != "cuda":
        skipped["fused_loss_backend"] = ("CPU has only the chunked torch backend (triton is "
                                         "CUDA only): ablated on CUDA as torch_loss_backend")
    return engines, skipped


def _engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"fast": True,
                          "packed": {"auto": None, "on": True, "off": False}[args.packed]}
    if args.max_waste is not None:
        kw["max_waste"] = args.max_waste
    if args.checkpointing:
        # The frozen prefix does not survive Hugging Face activation checkpointing: the
        # checkpointed layers lose the prefix's cached keys and values (attention then sees
        # fewer keys than its mask has columns). Until the engine turns it off by itself, as it
        # does for the last-layer tail, ours runs without it here.
        kw["frozen_prefix"] = False
    return kw


def run_main(model: nn.Module, p: Preset, rows: list[Row], args: argparse.Namespace,
             device: torch.device, peak_flops: float | None) -> dict[str, Any]:
    """Every side of the module docstring on both stages."""
    batch = make_batch(rows, p.window, args.seed)
    pub = make_batch(rows, p.window, args.seed, "index2")
    wanted = set(args.sides.split(",")) if args.sides else set(SIDES)
    ours = build_engine(model, **_engine_kwargs(args))
    naive = build_engine(model, fast=False)
    notes: dict[str, str] = {}
    heads = {}
    for name, head in (("strong", "torch"), ("strong_liger", "liger"), ("strong_cce", "cce")):
        if name in wanted:
            why = baselines.head_loss_available(head, device)
            if why is None:
                heads[name] = baselines.Strong(model, head=head)
            else:
                notes[name] = why
    if args.checkpointing:
        notes["ours"] = ("ours without the frozen prefix: it fails under Hugging Face "
                         "activation checkpointing (see _engine_kwargs)")
    out: dict[str, Any] = {
        "kernels": ours.kernels, "ours_packed": bool(ours.packed), "notes": notes,
        "batch": {"stage1": batch_stats(batch.stage1, pub.stage1, p.parrot, ours, naive,
                                        frozen_model=True),
                  "stage2": batch_stats(stage2_items(batch, args),
                                        pub.overwrite + pub.clean, p.parrot, ours, naive)}}

    out["batch"]["stage2"]["ours_tree_nodes"] = tree_nodes(ours, batch, p.parrot, args)
    e1: dict[str, tuple[LossEngine, list[StepItem], str | None]] = {"ours": (ours, batch.stage1,
                                                                               None)}
    o1: dict[str, tuple[Any, list[StepItem], str]] = {n: (h, batch.stage1, "ours")
                                                      for n, h in heads.items()}
    if "published" in wanted:
        e1["ours_pub"] = (ours, pub.stage1, None)
        o1["published"] = (baselines.Published(model), pub.stage1, "ours_pub")
    if "naive" in wanted:
        e1["naive"] = (naive, batch.stage1, "ours")
    s1 = stage1_sides(model, e1, o1, p, args.seed)
    out["stage1"] = measure_stage(s1, user_tokens(batch.stage1),
                                  useful_flops(model, batch.stage1, p.parrot, False), device,
                                  args, peak_flops)
    # Stage 2's frozen parrot: any parrot gives the same work; take ours' starting rows.
    parrot = ParrotSimulator(ours, n_tokens=p.parrot, seed=args.seed).parrot.detach().clone()
    del s1
    gc.collect()

    anchors = perturbed_anchors(ours, batch.clean, args.seed) if args.retain_weight else None
    e2: dict[str, tuple[LossEngine, Batch, bool, str | None]] = {"ours": (ours, batch, True, None)}
    o2: dict[str, tuple[Any, Batch, bool, str]] = {n: (h, batch, True, "ours")
                                                   for n, h in heads.items()}
    if "published" in wanted:
        e2["ours_pub"] = (ours, pub, False, None)
        o2["published"] = (baselines.Published(model), pub, False, "ours_pub")
    if "naive" in wanted:
        e2["naive"] = (naive, batch, True, "ours")
    s2 = stage2_sides(model, e2, o2, parrot, p, args.retain_weight, args.optimizer, anchors,
                      args.unlikely_weight)
    items2 = stage2_items(batch, args)
    out["stage2"] = measure_stage(s2, user_tokens(items2),
                                  useful_flops(model, items2, p.parrot, True), device, args,
                                  peak_flops)
    for stage in ("stage1", "stage2"):
        out[stage]["ratios"] = ratios(out[stage])
    return out


def run_variants(model: nn.Module, p: Preset, rows: list[Row], args: argparse.Namespace,
                 device: torch.device, peak_flops: float | None,
                 engines: dict[str, LossEngine], position: str = "random",
                 strong: bool = False) -> dict[str, Any]:
    """Both stages for a set of ours-engine variants (oracle: ``ours``), optionally with the
    strong side, at one parrot position."""
    batch = make_batch(rows, p.window, args.seed, position)
    e1 = {n: (eng, batch.stage1, None if n == "ours" else "ours") for n, eng in engines.items()}
    o1 = {"strong": (baselines.Strong(model), batch.stage1, "ours")} if strong else {}
    s1 = stage1_sides(model, e1, o1, p, args.seed)
    res = {"stage1": measure_stage(s1, user_tokens(batch.stage1),
                                   useful_flops(model, batch.stage1, p.parrot, False), device,
                                   args, peak_flops)}
    del s1
    ours = engines["ours"]
    parrot = ParrotSimulator(ours, n_tokens=p.parrot, seed=args.seed).parrot.detach().clone()
    anchors = perturbed_anchors(ours, batch.clean, args.seed) if args.retain_weight else None
    e2 = {n: (eng, batch, True, None if n == "ours" else "ours") for n, eng in engines.items()}
    o2 = {"strong": (baselines.Strong(model), batch, True, "ours")} if strong else {}
    s2 = stage2_sides(model, e2, o2, parrot, p, args.retain_weight, args.optimizer, anchors,
                      args.unlikely_weight)
    items2 = stage2_items(batch, args)
    res["stage2"] = measure_stage(s2, user_tokens(items2),
                                  useful_flops(model, items2, p.parrot, True), device, args,
                                  peak_flops)
    return res


def run_ablation(model: nn.Module, p: Preset, rows: list[Row], args: argparse.Namespace,
                 device: torch.device, peak_flops: float | None) -> dict[str, Any]:
    """Ours with each optimisation off in turn; per variant, each stage's median step time and
    its slowdown against ours with everything on (above 1: the optimisation helps)."""
    engines, skipped = ablation_engines(model, args, device)
    res = run_variants(model, p, rows, args, device, peak_flops, engines)
    summary = {}
    for name in engines:
        summary[name] = {}
        for stage in ("stage1", "stage2"):
            s = res[stage]["sides"]
            if name in s:
                summary[name][f"{stage}_median_ms"] = s[name]["median_ms"]
                summary[name][f"{stage}_slowdown"] = s[name]["median_ms"] / s["ours"]["median_ms"]
    return {**res, "summary": summary, "not_ablated": skipped}


def run_sweep(model: nn.Module, p: Preset, rows: list[Row], args: argparse.Namespace,
              device: torch.device, peak_flops: float | None) -> dict[str, Any]:
    """Ours and strong with the parrot at each of :data:`POSITIONS`, both stages."""
    ours = build_engine(model, **_engine_kwargs(args))
    out: dict[str, Any] = {}
    for pos in POSITIONS:
        res = run_variants(model, p, rows, args, device, peak_flops, {"ours": ours}, pos,
                           strong=True)
        for stage in ("stage1", "stage2"):
            res[stage]["ratios"] = ratios(res[stage])
        out[pos] = res
    out["summary"] = {pos: {f"{st}_{side}_median_ms": out[pos][st]["sides"][side]["median_ms"]
                            for st in ("stage1", "stage2") for side in ("ours", "strong")
                            if side in out[pos][st]["sides"]}
                      for pos in POSITIONS}
    return out


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU model / GPU name, library versions and thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers

    info: dict[str, Any] = {"cpu_model": cpu, "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "python": sys.version.split()[0],
                            # Other processes on the machine skew CPU timings (both sides alike,
                            # since they alternate); the load says how busy it was.
                            "load_avg_1m_at_start": os.getloadavg()[0]}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info.update(gpu_name=prop.name, gpu_mem_gib=prop.total_memory / 2**30,
                    gpu_sms=prop.multi_processor_count, cuda=torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info



def check_bars(preset: str, result: dict[str, Any]) -> dict[str, Any] | None:
    """Pass/fail of each bar of the preset (ours against naive), if it has bars."""
    bars = BARS.get(preset)
    if bars is None or "stage1" not in result:
        return None
    out: dict[str, Any] = {}
    for stage, b in bars.items():
        r = result[stage]["ratios"].get("ours_vs_naive")
        if r is None:
            return None
        out[stage] = {**b, "speedup": r["speedup"], "mem_ratio": r["mem_ratio"],
                      "speedup_ok": r["speedup"] >= b["min_speedup"],
                      "mem_ok": r["mem_ratio"] is not None and r["mem_ratio"] <= b["max_mem_ratio"]}
    return out


def print_stage(title: str, stage: dict[str, Any]) -> None:
    """One table of a stage's sides, then the ratios."""
    print(f"{title}: {stage['tokens']} tokens")
    hdr = (f"  {'side':<20}{'median ms':>11}{'min':>9}{'max':>9}{'cpu ms':>9}{'tok/s':>9}"
           f"{'peak MiB':>10}{'loss rel':>10}{'grad rel':>10}  oracle")
    print(hdr)
    for name, r in stage["sides"].items():
        mem = r["peak_mem_mib"]
        print(f"  {name:<20}{r['median_ms']:>11.1f}{r['min_ms']:>9.1f}{r['max_ms']:>9.1f}"
              f"{r['cpu_ms_median']:>9.1f}{r['tokens_per_s']:>9.0f}"
              f"{(f'{mem:.1f}' if mem is not None else '-'):>10}"
              f"{r.get('loss_rel_diff', 0.0):>10.1e}{r.get('grad_rel_diff', 0.0):>10.1e}"
              f"  {r.get('oracle') or '-'}")
    for name, why in stage.get("failed", {}).items():
        print(f"  {name}: {why}")
    for key, r in stage.get("ratios", {}).items():
        mr = r["mem_ratio"]
        print(f"  {key}: {r['speedup']:.2f}x wall, {r['speedup_cpu_time']:.2f}x cpu time, "
              f"mem ratio {mr:.3f}" if mr is not None else
              f"  {key}: {r['speedup']:.2f}x wall, {r['speedup_cpu_time']:.2f}x cpu time")


def print_result(result: dict[str, Any]) -> None:
    """A readable summary of the JSON."""
    m = result["machine"]
    dev = m.get("gpu_name") or f"{m['cpu_model']} ({m['torch_threads']} threads)"
    print(f"preset {result['preset']} (layers {result['config']['layers']}, rows "
          f"{result['config']['batch']}) mode {result['mode']} on {result['device']}: {dev}; "
          f"torch {m['torch']}; iters {result['iters']}, warmup {result['warmup']}, "
          f"checkpointing {result['checkpointing']}")
    for name, why in result.get("notes", {}).items():
        print(f"note: {why}")
    if result["mode"] == "sweep":
        for pos in POSITIONS:
            for stage in ("stage1", "stage2"):
                print_stage(f"{pos} {stage}", result[pos][stage])
        return
    for stage in ("stage1", "stage2"):
        print_stage(stage, result[stage])
    if result["mode"] == "ablation":
        for name, why in result["not_ablated"].items():
            print(f"not ablated: {name}: {why}")
    if result.get("bars"):
        for stage, b in result["bars"].items():
            print(f"bar {stage} (vs naive): speedup >= {b['min_speedup']} "
                  f"{'PASS' if b['speedup_ok'] else 'FAIL'}; mem ratio <= {b['max_mem_ratio']} "
                  f"{'PASS' if b['mem_ok'] else 'FAIL'}")


# ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and rows, run the mode, return the result dict."""
    p = PRESETS[args.preset]
    if args.layers:
        p = replace(p, layers=args.layers)
    if args.rows:
        p = replace(p, batch=args.rows)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(p, device, args.seed)
    if args.checkpointing:
        # Every side then runs with activation checkpointing (Hugging Face checkpoints only in
        # train mode; Llama has no dropout, so the maths is unchanged).
        baselines.set_checkpointing(model, True)
        model.train()
    rows = make_rows(p, args.seed)
    peak_flops = None
    if device.type == "cuda":
        peak_flops = args.peak_flops or gpu_peak_bf16(torch.cuda.get_device_name(device))
    result: dict[str, Any] = {
        "device": device.type, "preset": p.name, "mode": args.mode, "config": asdict(p),
        "machine": machine_info(device),
        "params": sum(t.numel() for t in {id(t): t for t in model.parameters()}.values()),
        "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
        "checkpointing": bool(args.checkpointing), "optimizer": args.optimizer,
        "retain_weight": args.retain_weight,
        "unlikely_weight": args.unlikely_weight,
        "mem_method": MEM_METHOD[device.type], "mem_unit": "MiB",
        "tokens_definition": "prompt + response tokens of every sequence the step trains on "
                             "(stage 2: the overwrite and the clean copy of each row); parrot "
                             "rows and padding excluded; same count for every side",
        "speedup_definition": "baseline median step time / ours median step time (above 1: "
                              "ours is faster); mem_ratio = ours peak / baseline peak",
        "peak_bf16_flops": peak_flops,
    }
    mode = {"main": run_main, "ablation": run_ablation, "sweep": run_sweep}[args.mode]
    result.update(mode(model, p, rows, args, device, peak_flops))
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    result["bars"] = (check_bars(p.name, result)
                      if device.type == "cpu" and args.mode == "main" and not args.layers
                      else None)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print the tables, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--mode", default="main", choices=["main", "ablation", "sweep"])
    ap.add_argument("--sides", default="",
                    help=f"main mode: comma list of {', '.join(SIDES[1:])} (default all; ours "
                         "always runs, ours_pub with published)")
    ap.add_argument("--layers", type=int, default=0, help="override the preset's depth")
    ap.add_argument("--rows", type=int, default=0, help="override the preset's rows per step")
    ap.add_argument("--iters", type=int, default=5, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps per side after the (optimizer-free) checked step")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-waste", type=float, default=None,
                    help="ours: padding share cap per bucket (default: the engine's)")
    ap.add_argument("--packed", default="auto", choices=["auto", "on", "off"],
                    help="ours: packed rows (auto: on CUDA when the model keeps them apart)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--retain-weight", type=float, default=30.0,
                    help="stage 2: sanitize's hidden-state retention term (every side but "
                         "published / ours_pub; 0: off)")
    ap.add_argument("--unlikely-weight", type=float, default=0.0,
                    help="stage 2: the unlikelihood term on twins of the overwrite items "
                         "(sanitize's default on models from 50M parameters is 1; 0: off)")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                    help="stage 2's optimizer, shared by all sides (sgd: less state, for 7B)")
    ap.add_argument("--checkpointing", action="store_true",
                    help="activation checkpointing on for every side (published always has it)")
    ap.add_argument("--peak-flops", type=float, default=None,
                    help="GPU peak bf16 FLOP/s for MFU (default: looked up from the GPU name)")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        ap.error("--iters must be >= 1 and --warmup >= 0")
    unknown = set(filter(None, args.sides.split(","))) - set(SIDES)
    if unknown:
        ap.error(f"unknown sides: {', '.join(sorted(unknown))}")
    result = run(args)
    print_result(result)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, allow_nan=False, default=_json_default)
        print(f"wrote {args.json}")
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")



if __name__ == "__main__":
    sys.exit(main())
