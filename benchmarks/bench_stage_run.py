"""Whole stage runs: stage 1 with frozen-prefix reuse across steps on vs off, stage 2 with the
shared system prefix on vs off.

A stage-1 run (:func:`sande_fast.stages.simulate`, also each probe try) trains a parrot on the
frozen model for N steps; every step draws rows and fresh splice positions. With reuse on (the
default, :meth:`~sande_fast.engine.LossEngine.reuse_frozen_prefixes`) the keys and values of a
row's prompt before the splice are computed when first needed and sliced at later steps; off
(``reuse_budget=0``), every step runs its prefixes again, the per-step frozen prefix of before.
Both sides run the same steps (same seed: same rows, splices, parrot start), so their loss
curves must agree to float rounding; the report says how closely they do.

Stage 2 (``--stage 2``, :func:`sande_fast.stages.eliminate`, AdamW on the model, overwrite items
with a fixed parrot plus clean items): ``min_shared_prefix`` 16 (on, the default) vs 0 (off).
With it on, a prompt prefix every row of a micro-batch shares (the chat layout's system block)
runs once per micro-batch, with a graph, instead of once per row. Each side starts from a copy
of the same weights.

Layouts (one randomly initialised Llama-style model each, no download):

* ``small``: bench_sanitize.py's ``small`` shape and lengths (prompt 40-200 tokens: 6 header
  tokens, user text, 4 marker tokens; hidden 512, 8 layers, vocab 32000, fp32).
* ``chat``: the same model with a chat-template layout: one shared 32-token system block before
  varied user text (16-120 tokens), then a 5-token assistant marker.

Time is process CPU time of the whole run (meaningful at ``--threads 1`` on a shared machine),
the two sides alternating per repeat.

Usage::

    python benchmarks/bench_stage_run.py --json out.json [--stage 1] [--layout small]
        [--steps 50] [--rows 32] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from sande_fast.data import EncodedPrompt
from sande_fast.engine import LossEngine
from sande_fast.stages import TrainRow, eliminate, simulate


@dataclass(frozen=True)
class Layout:
    """A prompt layout: fixed header tokens, user text of a uniform length, fixed marker."""

    name: str
    header: int
    user_len: tuple[int, int]
    marker: int


LAYOUTS = {
    # prompt 40-200 tokens as in bench_sanitize.py's small preset: header 6 + user + marker 4
    "small": Layout("small", header=6, user_len=(30, 190), marker=4),
    # a chat template: <|im_start|>system ... (32 tokens) <|im_start|>user {text} <|im_start|>assistant
    "chat": Layout("chat", header=32, user_len=(16, 120), marker=5),
}

MODEL = dict(hidden=512, layers=8, heads=8, kv_heads=8, intermediate=1376, vocab=32000)


def build_model(seed: int) -> torch.nn.Module:
    """The randomly initialised fp32 Llama-style model of ``MODEL`` (SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=MODEL["vocab"], hidden_size=MODEL["hidden"],
                      intermediate_size=MODEL["intermediate"],
                      num_hidden_layers=MODEL["layers"], num_attention_heads=MODEL["heads"],
                      num_key_value_heads=MODEL["kv_heads"], max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float().eval()


def make_rows(layout: Layout, n: int, seed: int) -> list[TrainRow]:
    """``n`` rows: shared header, seeded random user text, shared marker; the parrot goes
    anywhere in the user text, as in the real pipeline."""
    rng = random.Random(seed)
    vocab = MODEL["vocab"]
    header = [rng.randrange(3, vocab) for _ in range(layout.header)]
    marker = [rng.randrange(3, vocab) for _ in range(layout.marker)]
    rows = []
    for _ in range(n):
        user = [rng.randrange(3, vocab) for _ in range(rng.randint(*layout.user_len))]
        ids = header + user + marker
        response = tuple(rng.randrange(3, vocab) for _ in range(rng.randint(12, 40)))
        rows.append(TrainRow("", EncodedPrompt(ids, (len(header), len(header) + len(user))),
                             response))
    return rows


def run_once(model: torch.nn.Module, rows: Sequence[TrainRow], target: Sequence[int],
             reuse: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One stage-1 run of ``args.steps`` steps; its CPU and wall time, curve and cache counts."""
    if args.stage == 2:
        return run_stage2(model, rows, reuse, args)
    eng = LossEngine(model, fast=True, packed=False, max_batch=64,
                     reuse_budget=args.budget_mib * 2**20 if reuse else 0)
    cpu, wall = time.process_time(), time.perf_counter()
    with eng.reuse_frozen_prefixes() as cache:  # simulate's own scope nests in this one
        parrot, curve = simulate(eng, rows, target, steps=args.steps, lr=1e-2,
                                 n_tokens=args.parrot, batch_size=args.batch, seed=args.seed)
        stats = ({"prompt_forwards": cache.computed, "prompts_served_from_cache": cache.hits,
                  "kept_mib": round(cache.bytes / 2**20, 2), "kept_prompts": len(cache)}
                 if cache is not None else None)
    return {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
            "curve": curve, "parrot": parrot, "cache": stats}


def run_stage2(model: torch.nn.Module, rows: Sequence[TrainRow], shared: bool,
               args: argparse.Namespace) -> dict[str, Any]:
    """``args.steps`` stage-2 steps on a copy of ``model``, the shared prefix on or off."""
    model = copy.deepcopy(model)
    eng = LossEngine(model, fast=True, packed=False, max_batch=64,
                     min_shared_prefix=16 if shared else 0)
    g = torch.Generator().manual_seed(args.seed)
    parrot = 0.02 * torch.randn(args.parrot, MODEL["hidden"], generator=g)
    cpu, wall = time.process_time(), time.perf_counter()
    curve = eliminate(eng, rows, steps=args.steps, lr=1e-5, batch_size=args.batch,
                      seed=args.seed, window=10, clean_weight=1.0, parrot=parrot)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    first = next(model.parameters()).detach().clone()
    return {"cpu_s": cpu, "wall_s": wall, "curve": curve, "parrot": first, "cache": None}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    layout = LAYOUTS[args.layout]
    model = build_model(args.seed)
    rows = make_rows(layout, args.rows, args.seed)
    target = [random.Random(args.seed + 7).randrange(3, MODEL["vocab"]) for _ in range(10)]
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for r in range(args.repeats):
        for side in (("off", "on") if r % 2 else ("on", "off")):
            runs[side].append(run_once(model, rows, target, side == "on", args))
            print(f"repeat {r + 1} {side}: {runs[side][-1]['cpu_s']:.1f} s CPU",
                  file=sys.stderr)
    on, off = runs["on"][0], runs["off"][0]
    rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(on["curve"], off["curve"]))
    cpu_on = statistics.median(x["cpu_s"] for x in runs["on"])
    cpu_off = statistics.median(x["cpu_s"] for x in runs["off"])
    return {
        "benchmark": ("stage-1 run, frozen-prefix reuse on vs off" if args.stage == 1 else
                      "stage-2 run, shared micro-batch prefix on vs off"),
        "stage": args.stage,
        "layout": args.layout, "layout_spec": vars(layout), "model": MODEL,
        "steps": args.steps, "batch": args.batch, "rows": args.rows, "parrot": args.parrot,
        "seed": args.seed, "repeats": args.repeats, "reuse_budget_mib": args.budget_mib,
        "prompt_len_mean": statistics.mean(len(r.prompt.ids) for r in rows),
        "cpu_s_on": cpu_on, "cpu_s_off": cpu_off,
        "cpu_s_each": {k: [x["cpu_s"] for x in v] for k, v in runs.items()},
        "wall_s_each": {k: [x["wall_s"] for x in v] for k, v in runs.items()},
        "speedup_cpu": cpu_off / cpu_on,
        "cache": on["cache"],
        "losses_bitwise_equal": on["curve"] == off["curve"],
        "loss_max_rel_diff": rel,
        # stage 1: the learnt parrots; stage 2: the first trained weight matrix
        "result_max_abs_diff": float((on["parrot"] - off["parrot"]).abs().max()),
        "final_loss": {"on": on["curve"][-1], "off": off["curve"][-1]},
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stage", type=int, choices=(1, 2), default=1)
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="small")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8, help="rows per step")
    ap.add_argument("--rows", type=int, default=32, help="rows the steps draw from")
    ap.add_argument("--parrot", type=int, default=6, help="parrot rows")
    ap.add_argument("--repeats", type=int, default=1, help="runs per side (median CPU time)")
    ap.add_argument("--budget-mib", type=int, default=1024, help="reuse budget (MiB)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--json", required=True, help="where the report goes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = bench(args)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"stage {args.stage} {args.layout}: on {out['cpu_s_on']:.1f} s, off "
          f"{out['cpu_s_off']:.1f} s CPU: {out['speedup_cpu']:.2f}x; loss max rel diff "
          f"{out['loss_max_rel_diff']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
