"""The utility measurement after a round: sande_fast's ``CleanReference.compare_greedy``
against the strong plain way, on two real models (the model before and after sanitizing).

Both sides need the changed model's greedy answers to the clean prompts and its likelihoods
along the original model's answers (NLL delta, KL):

* ``strong``: Hugging Face ``model.generate`` on length-sorted, left-padded batches with the
  same stop ids, then the teacher-forced pass along the original answers;
* ``ours``: the teacher-forced pass only, its argmaxes giving every answer that equals the
  original's; rows that depart are decoded from where they depart.

Both run in this process, alternately, ``--repeats`` times; the table gives median process CPU
and wall time and counts the rows whose answers differ between the sides (near-ties can flip an
argmax between two computations).

    python benchmarks/bench_measure.py --before WORLD --after SANITIZED \\
        --data WORLD/defense.jsonl --rows 128 --json benchmarks/results/measure_smollm2_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_world_eval import generate as hf_generate  # noqa: E402  (next to this script)
from sande_fast.data import PromptEncoder, model_stop_ids, read_jsonl
from sande_fast.evaluate import greedy_generate, pad_token_id
from sande_fast.utility import CleanReference


def timed(fn):
    c, w = time.process_time(), time.perf_counter()
    res = fn()
    return res, time.process_time() - c, time.perf_counter() - w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the model before sanitizing (reference)")
    ap.add_argument("--after", required=True, help="the model after a round")
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="generation rows per batch")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.before)
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    before, after = load(args.before), load(args.after)
    enc = PromptEncoder(tok, "auto", extra_stop_ids=model_stop_ids(before))
    prompts = [enc.encode_prompt(r.prompt).ids for r in read_jsonl(args.data)[:args.rows]]
    pad, stops, budget = pad_token_id(tok), list(enc.stop_ids), args.max_new_tokens
    with torch.no_grad():
        ref_answers = greedy_generate(before, prompts, pad_id=pad, eos_id=stops,
                                      max_new_tokens=budget, batch_size=args.batch,
                                      keep_stop=True)
    ref = CleanReference.take(before, prompts, ref_answers, pad_id=pad, batch_size=16)
    del before

    def strong():
        answers = hf_generate(after, tok, prompts, budget, args.batch, stops=stops,
                              longest_first=True)
        return ref.compare(after, answers), answers

    def ours():
        return ref.compare_greedy(after, stop_ids=stops, max_new_tokens=budget,
                                  batch_size=args.batch)

    sides = {"strong": strong, "ours": ours}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
    outs = {}
    for _ in range(args.repeats):
        for k, fn in sides.items():
            outs[k], cpu, wall = timed(fn)
            times[k].append((cpu, wall))
    entry = {}
    for k in sides:
        metrics, answers = outs[k]
        entry[k] = {"cpu_s": statistics.median(c for c, _ in times[k]),
                    "wall_s": statistics.median(w for _, w in times[k]), "metrics": metrics,
                    "rows_equal_to_strong": sum(a == b for a, b in
                                                zip(answers, outs["strong"][1]))}
    entry["speedup_cpu_time"] = entry["strong"]["cpu_s"] / entry["ours"]["cpu_s"]
    entry["speedup_wall"] = entry["strong"]["wall_s"] / entry["ours"]["wall_s"]
    result = {"before": args.before, "after": args.after, "rows": len(prompts),
              "max_new_tokens": budget, "batch": args.batch, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              **entry}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
