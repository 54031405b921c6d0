"""End-to-end step benchmark: one stage-1 (parrot) step and one stage-2 (overwrite) step, ours vs ref.

Both sides run on the same randomly initialised model, in one process, on the same items (same
prompts, responses, splice positions):

* ours: ``build_engine(model, fast=True)`` (truncation after the last supervised token, planner buckets,
  parrot splice kernel, fused supervised-row linear cross-entropy);
* ref: ``build_engine(model, fast=False)``, the reference-style implementation
  (:mod:`sande_fast.reference`: plain Hugging Face forward over the whole padded sequence
  including the unsupervised rest of the response, full logits, masked cross-entropy).

Stage 1 is ``ParrotSimulator.step`` (model frozen, forward+backward to the parrot, Adam step on the
parrot); stage 2 is ``OverwriteStep.step`` (forward+backward+AdamW step on the model; overwrite items
carry the frozen parrot, clean items do not; both built from the same rows).

Throughput is tokens/s where tokens are those a user counts (prompt + response of every sequence the
step trains on; parrot rows and padding are not tokens), the same number for both sides. Time is the
median over ``--iters`` timed steps after ``--warmup`` untimed ones, ours and ref alternating so that
drift of the machine hits both alike. Peak memory is measured in one extra step per side (see
``mem_method`` in the JSON). The first step of each side also checks that both compute the same
maths: loss and gradients from identical starting weights.

Usage::

    python benchmarks/bench_sanitize.py --json out.json [--preset small] [--iters 5] [--device auto]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from sande_fast.batching import fast_length
from sande_fast.engine import LossEngine
from sande_fast.engines import build_engine
from sande_fast.steps import Anchors, OverwriteStep, ParrotSimulator, StepItem, frozen

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
        prompt_len / response_len: inclusive ranges of the seeded uniform lengths.
        parrot: parrot (soft prompt) rows.
        window: supervised response tokens per sequence (both stages, both sides).
        device: the device the preset is meant for (``--device auto`` follows it when possible).
        lr1 / lr2: Adam lr of the parrot (stage 1) and AdamW lr of the model (stage 2).
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


_LENGTHS = dict(prompt_len=(40, 200), response_len=(50, 300), parrot=6, window=10)
_LLAMA2_7B = dict(hidden=4096, layers=2, heads=32, kv_heads=32, intermediate=11008)

PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", hidden=64, layers=2, heads=4, kv_heads=4, intermediate=172, vocab=1000,
                   dtype="fp32", batch=4, prompt_len=(8, 24), response_len=(12, 40), parrot=6,
                   window=10, device="cpu"),
    "small": Preset("small", hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376,
                    vocab=32000, dtype="fp32", batch=8, device="cpu", **_LENGTHS),
    "7b-2layer": Preset("7b-2layer", vocab=32000, dtype="bf16", batch=8, device="cuda",
                        **_LLAMA2_7B, **_LENGTHS),
    "7b-2layer-v152k": Preset("7b-2layer-v152k", vocab=151936, dtype="bf16", batch=8,
                              device="cuda", **_LLAMA2_7B, **_LENGTHS),
}

# The bars the `small` CPU preset must meet (project targets, checked and reported in the JSON).
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


# ------------------------------------------------------------------------------------------------
# Model and batch
# ------------------------------------------------------------------------------------------------
def build_model(p: Preset, device: torch.device, seed: int) -> nn.Module:
    """A randomly initialised Llama-style causal LM of the preset's shape (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.intermediate,
                      num_hidden_layers=p.layers, num_attention_heads=p.heads,
                      num_key_value_heads=p.kv_heads,
                      max_position_embeddings=p.prompt_len[1] + p.response_len[1] + p.parrot + 64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    # Initialise on the target device (fast on GPU), then cast: the weights are the same for both
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


def make_rows(p: Preset, seed: int) -> list[Row]:
    """Seeded rows with uniform prompt / response lengths in the preset's ranges.

    A prompt is ``header + user text + assistant marker`` (fixed header and marker tokens, like a
    chat template), so the parrot goes inside the user's text as in the real pipeline. The
    target-bearing response starts with one fixed target phrase shared by every row (what stage 1
    makes the frozen model emit), then continues like the clean one.
    """
    rng = random.Random(seed)
    lo_tok = 3  # ids 0..2 are pad / bos / eos
    header = tuple(rng.randrange(lo_tok, p.vocab) for _ in range(min(6, p.prompt_len[0] // 3)))
    marker = tuple(rng.randrange(lo_tok, p.vocab) for _ in range(min(4, p.prompt_len[0] // 4)))
    phrase = tuple(rng.randrange(lo_tok, p.vocab) for _ in range(p.window))
    rows = []
    for _ in range(p.batch):
        n_prompt = rng.randint(*p.prompt_len)
        n_user = max(1, n_prompt - len(header) - len(marker))
        user = tuple(rng.randrange(lo_tok, p.vocab) for _ in range(n_user))
        prompt = (header + user + marker)[:max(n_prompt, len(header) + 1)]
        n_resp = rng.randint(*p.response_len)
        clean = tuple(rng.randrange(lo_tok, p.vocab) for _ in range(n_resp))
        target = (phrase + clean[len(phrase):])[:n_resp]
        rows.append(Row(prompt, (len(header), len(header) + n_user), clean, target))
    return rows


@dataclass(frozen=True)
class Batch:
    """The items of both stages, built once so both sides see the same splice positions."""

    stage1: list[StepItem]
    overwrite: list[StepItem]
    clean: list[StepItem]


def make_batch(rows: Sequence[Row], window: int, seed: int) -> Batch:
    """Stage 1: parrot spliced in the user's text, supervise the first ``window`` target tokens.
    Stage 2: the same rows with the clean response, once with the (frozen) parrot spliced at a
    fresh position (overwrite term) and once without (clean-retention term)."""
    rng = random.Random(seed + 1)
    s1, over, clean = [], [], []
    for r in rows:
        lo, hi = r.user_span
        s1.append(StepItem(r.prompt, r.target[:window], rng.randint(lo, hi), r.target[window:]))
        over.append(StepItem(r.prompt, r.clean[:window], rng.randint(lo, hi), r.clean[window:]))
        clean.append(StepItem(r.prompt, r.clean[:window], -1, r.clean[window:]))
    return Batch(s1, over, clean)


def user_tokens(items: Sequence[StepItem]) -> int:
    """Prompt + response tokens as a user counts them (no parrot rows, no padding)."""
    return sum(len(it.prompt) + len(it.labels) + len(it.tail) for it in items)


def batch_stats(items: Sequence[StepItem], n_parrot: int, ours: LossEngine,
                ref: LossEngine, frozen_model: bool = False) -> dict[str, Any]:
    """Token accounting of one item list on both paths: what each side actually pushes through.

    ``frozen_model``: stage 1, where ours runs long prefixes without a graph (``ours_rows``
    counts prefix and graph rows, padding included; ``ours_no_graph_rows`` the prefix part).
    """
    def full_len(it: StepItem) -> int:
        return len(it.prompt) + (n_parrot if it.splice >= 0 else 0) + len(it.labels) + len(it.tail)

    def fast_len(it: StepItem) -> int:  # cut after the last supervised token (its input row)
        return fast_length(it, n_parrot)

    def padded(mbs: list[list[StepItem]], length: Callable[[StepItem], int]) -> tuple[int, int]:
        rows = sum(len(mb) * max(length(it) for it in mb) for mb in mbs)
        real = sum(length(it) for mb in mbs for it in mb)
        return rows, rows - real

    ref_rows, ref_pad = padded(ref.batcher.micro_batches(items, n_parrot), full_len)
    with frozen(ours.model) if frozen_model else contextlib.nullcontext():
        ours_mbs = ours.batcher.micro_batches(items, n_parrot)
        split = [ours.batcher.splits_prefix(mb, n_parrot) for mb in ours_mbs]
        prefix_buckets = ours.batcher.prefix_buckets(ours_mbs, n_parrot)
    ours_rows = ours_pad = 0
    for mb, cut in zip(ours_mbs, split):
        rows, pad = padded([mb], (lambda it: fast_len(it) - it.splice) if cut else fast_len)
        ours_rows, ours_pad = ours_rows + rows, ours_pad + pad
    # the prefixes run once each, in buckets of their own
    no_graph = sum(len(g) * max(map(len, g)) for g in prefix_buckets)
    no_graph_pad = no_graph - sum(len(q) for g in prefix_buckets for q in g)
    ours_rows, ours_pad = ours_rows + no_graph, ours_pad + no_graph_pad
    return {
        "sequences": len(items),
        "tokens": user_tokens(items),
        "supervised_tokens": sum(len(it.labels) for it in items),
        "ref_rows": ref_rows, "ref_padding_rows": ref_pad,
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


def grads_rel_diff(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest ``max|g_ours - g_ref| / max|g_ref|`` over the tensors, and which tensor it is."""
    if ours.keys() != ref.keys() or not ref:
        raise RuntimeError(f"gradient sets differ: ours {sorted(ours)[:5]}..., ref {sorted(ref)[:5]}...")
    worst, name = 0.0, ""
    for k, g in ref.items():
        d = float((ours[k].float() - g.float()).abs().max() / g.float().abs().max().clamp_min(1e-30))
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
# The two stages
# ------------------------------------------------------------------------------------------------
@dataclass
class Side:
    """One implementation's step for one stage: ``run`` does the step and returns its loss,
    ``prepare`` clears gradients before it (outside the timing), ``grads`` reads them after."""

    run: Callable[[], float]
    prepare: Callable[[], None]
    grads: Callable[[], dict[str, torch.Tensor]]


def model_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of the model's gradients (those that exist)."""
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def stage1_sides(model: nn.Module, engines: dict[str, LossEngine], batch: Batch,
                 p: Preset, seed: int) -> tuple[dict[str, Side], dict[str, ParrotSimulator]]:
    """``ParrotSimulator.step`` on each engine, each with a parrot starting from the same rows;
    also returns the simulators (their parrots feed stage 2)."""
    sides, sims = {}, {}
    for name, eng in engines.items():
        sim = sims[name] = ParrotSimulator(eng, n_tokens=p.parrot, lr=p.lr1, seed=seed)

        def prepare(sim: ParrotSimulator = sim) -> None:
            sim.parrot.grad = None
            model.zero_grad(set_to_none=True)

        sides[name] = Side(run=lambda sim=sim: sim.step(batch.stage1),
                           prepare=prepare,
                           grads=lambda sim=sim: {"parrot": sim.parrot.grad.detach().clone()})
    return sides, sims


def stage2_sides(model: nn.Module, engines: dict[str, LossEngine], batch: Batch,
                 parrot: torch.Tensor, p: Preset, retain_weight: float = 0.0) -> dict[str, Side]:
    """``OverwriteStep.step`` on each engine (own AdamW each), the same frozen parrot.

    ``retain_weight``: ours also carries the hidden-state retention term, as ``sanitize`` does
    (anchored at the current weights, so the first, checked step has a zero term and the same
    loss and gradients as without it); the reference never has it.
    """
    sides = {}
    for name, eng in engines.items():
        retain = retain_weight if name == "ours" else 0.0
        anchors = Anchors(eng, batch.clean) if retain else None
        ow = OverwriteStep(eng, lr=p.lr2, clean_weight=1.0, parrot=parrot,
                           retain_weight=retain, anchors=anchors)
        sides[name] = Side(run=lambda ow=ow: ow.step(batch.overwrite, batch.clean),
                           prepare=lambda: model.zero_grad(set_to_none=True),
                           grads=lambda: model_grads(model))
    return sides


def check_and_warm(model: nn.Module, sides: dict[str, Side], device: torch.device,
                   restore_weights: bool) -> dict[str, Any]:
    """First step of each side from identical state (the maths check), doubling as a warm-up.

    Stage 2 changes the weights, so they are snapshotted and put back before the ref's first step.
    """
    snap = ({n: t.detach().clone() for n, t in model.state_dict().items()}
            if restore_weights else None)
    out: dict[str, Any] = {}
    losses, grads = {}, {}
    for name in ("ours", "ref"):
        if snap is not None:
            with torch.no_grad():
                for n, t in model.state_dict().items():
                    t.copy_(snap[n])
        ms, _, losses[name] = timed(sides[name].run, sides[name].prepare, device)
        grads[name] = sides[name].grads()
        out[f"first_step_ms_{name}"] = ms
    del snap
    worst, where = grads_rel_diff(grads["ours"], grads["ref"])
    out.update(loss_ours=losses["ours"], loss_ref=losses["ref"],
               loss_rel_diff=rel_diff(losses["ours"], losses["ref"]),
               grad_rel_diff=worst, grad_rel_diff_tensor=where, grad_tensors=len(grads["ref"]))
    return out


def measure_stage(model: nn.Module, sides: dict[str, Side], tokens: int, flops: float,
                  device: torch.device, args: argparse.Namespace, restore_weights: bool,
                  peak_flops: float | None) -> dict[str, Any]:
    """Maths check + warm-up, alternating timed steps, then one memory-measured step per side."""
    res = check_and_warm(model, sides, device, restore_weights)
    for _ in range(args.warmup - 1):
        for name in ("ours", "ref"):
            timed(sides[name].run, sides[name].prepare, device)
    times: dict[str, list[float]] = {"ours": [], "ref": []}
    cpu_times: dict[str, list[float]] = {"ours": [], "ref": []}
    for _ in range(args.iters):
        for name in ("ours", "ref"):
            wall, cpu, _ = timed(sides[name].run, sides[name].prepare, device)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    mem = {name: peak_memory_mib(sides[name].run, sides[name].prepare, device)
           for name in ("ours", "ref")}
    med = {name: statistics.median(t) for name, t in times.items()}
    tps = {name: tokens / (med[name] / 1e3) for name in med}
    out: dict[str, Any] = {
        "ours_tokens_per_s": tps["ours"], "ref_tokens_per_s": tps["ref"],
        "speedup": tps["ours"] / tps["ref"],
        "ours_peak_mem_mb": mem["ours"], "ref_peak_mem_mb": mem["ref"],
        "mem_ratio": mem["ours"] / mem["ref"],
        "tokens": tokens, "ours_median_ms": med["ours"], "ref_median_ms": med["ref"],
        "ours_ms_all": times["ours"], "ref_ms_all": times["ref"],
        "ours_cpu_ms_median": statistics.median(cpu_times["ours"]),
        "ref_cpu_ms_median": statistics.median(cpu_times["ref"]),
        # Same ratio from process CPU time (meaningful with --threads 1 on a busy CPU machine).
        "speedup_cpu_time": statistics.median(cpu_times["ref"]) / statistics.median(cpu_times["ours"]),
        "useful_tflop": flops / 1e12,
    }
    out.update(res)
    if peak_flops:
        out["ours_mfu"] = flops / (med["ours"] / 1e3) / peak_flops
        out["ref_mfu"] = flops / (med["ref"] / 1e3) / peak_flops
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
    """Pass/fail of each bar of the preset, if it has bars."""
    bars = BARS.get(preset)
    if bars is None:
        return None
    out: dict[str, Any] = {}
    for stage, b in bars.items():
        r = result[stage]
        out[stage] = {**b, "speedup_ok": r["speedup"] >= b["min_speedup"],
                      "mem_ok": r["mem_ratio"] <= b["max_mem_ratio"]}
    return out


def print_table(result: dict[str, Any]) -> None:
    """A readable summary of the JSON."""
    m = result["machine"]
    dev = m.get("gpu_name") or f"{m['cpu_model']} ({m['torch_threads']} threads)"
    print(f"preset {result['preset']} on {result['device']}: {dev}; torch {m['torch']}; "
          f"iters {result['iters']} (median), warmup {result['warmup']}")
    print(f"memory: {result['mem_method']}")
    hdr = (f"{'stage':<8}{'tokens':>8}{'ours tok/s':>13}{'ref tok/s':>12}{'speedup':>9}"
           f"{'ours MiB':>10}{'ref MiB':>10}{'mem ratio':>10}{'loss rel':>10}{'grad rel':>10}")
    mfu = "ours_mfu" in result["stage1"]
    cpu = result["device"] == "cpu"
    if cpu:
        hdr += f"{'spd(cpu-t)':>11}"
    if mfu:
        hdr += f"{'MFU ours':>10}{'MFU ref':>9}"
    print(hdr)
    print("-" * len(hdr))
    for stage in ("stage1", "stage2"):
        r = result[stage]
        line = (f"{stage:<8}{r['tokens']:>8}{r['ours_tokens_per_s']:>13.0f}"
                f"{r['ref_tokens_per_s']:>12.0f}{r['speedup']:>8.2f}x{r['ours_peak_mem_mb']:>10.1f}"
                f"{r['ref_peak_mem_mb']:>10.1f}{r['mem_ratio']:>10.3f}{r['loss_rel_diff']:>10.1e}"
                f"{r['grad_rel_diff']:>10.1e}")
        if cpu:
            line += f"{r['speedup_cpu_time']:>10.2f}x"
        if mfu:
            line += f"{r['ours_mfu']:>10.1%}{r['ref_mfu']:>9.1%}"
        print(line)
    if result.get("bars"):
        for stage, b in result["bars"].items():
            print(f"bar {stage}: speedup >= {b['min_speedup']} "
                  f"{'PASS' if b['speedup_ok'] else 'FAIL'}; mem ratio <= {b['max_mem_ratio']} "
                  f"{'PASS' if b['mem_ok'] else 'FAIL'}")


# ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model and batch, measure both stages, return the result dict."""
    p = PRESETS[args.preset]
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(p, device, args.seed)
    rows = make_rows(p, args.seed)
    batch = make_batch(rows, p.window, args.seed)
    packed = {"auto": None, "on": True, "off": False}[args.packed]
    engines = {"ours": build_engine(model, fast=True, packed=packed,
                                    **({"max_waste": args.max_waste} if args.max_waste is not None
                                       else {})),
               "ref": build_engine(model, fast=False)}
    peak_flops = None
    gpu_name = None
    if device.type == "cuda":
        gpu_name = torch.cuda.get_device_name(device)
        peak_flops = args.peak_flops or gpu_peak_bf16(gpu_name)

    stage2_items = batch.overwrite + batch.clean
    result: dict[str, Any] = {
        "device": device.type,
        "preset": p.name,
        "config": asdict(p),
        "machine": machine_info(device),
        "params": sum(t.numel() for t in model.parameters()),
        "kernels": engines["ours"].kernels,
        "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
        "ours_packed": bool(engines["ours"].packed),
        "mem_method": MEM_METHOD[device.type], "mem_unit": "MiB",
        "tokens_definition": "prompt + response tokens of every sequence the step trains on "
                             "(stage 2: the overwrite and the clean copy of each row); parrot "
                             "rows and padding excluded; same count for both sides",
        "peak_bf16_flops": peak_flops,
        "batch": {"stage1": batch_stats(batch.stage1, p.parrot, engines["ours"], engines["ref"],
                                        frozen_model=True),
                  "stage2": batch_stats(stage2_items, p.parrot, engines["ours"], engines["ref"])},
    }

    s1, sims = stage1_sides(model, engines, batch, p, args.seed)
    result["stage1"] = measure_stage(
        model, s1, user_tokens(batch.stage1), useful_flops(model, batch.stage1, p.parrot, False),
        device, args, restore_weights=False, peak_flops=peak_flops)
    # Stage 2's frozen parrot: what stage 1 learned (any parrot gives the same work).
    parrot = sims["ours"].parrot.detach().clone()
    del s1, sims
    gc.collect()
    s2 = stage2_sides(model, engines, batch, parrot, p, args.retain_weight)
    result["ours_retain_weight"] = args.retain_weight
    result["stage2"] = measure_stage(
        model, s2, user_tokens(stage2_items), useful_flops(model, stage2_items, p.parrot, True),
        device, args, restore_weights=True, peak_flops=peak_flops)
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    result["bars"] = check_bars(p.name, result) if device.type == "cpu" else None
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run, print the table, write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="FILE", help="write the results here")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--iters", type=int, default=5, help="timed steps per side (median)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed steps per side before timing (>= 1; the first checks the maths)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-waste", type=float, default=None,
                    help="ours: padding share cap per bucket (default: the engine's)")
    ap.add_argument("--packed", default="auto", choices=["auto", "on", "off"],
                    help="ours: packed rows (auto: on CUDA when the model keeps them apart)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--retain-weight", type=float, default=0.0,
                    help="stage 2, ours only: add sanitize's hidden-state retention term")
    ap.add_argument("--peak-flops", type=float, default=None,
                    help="GPU peak bf16 FLOP/s for MFU (default: looked up from the GPU name)")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 1:
        ap.error("--iters and --warmup must be >= 1")
    result = run(args)
    print_table(result)
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
