"""--train full vs --train lora on a make-world world (a real pretrained model): the two
``sande-fast sanitize`` runs side by side, one process each, with the same options.

Each run is its own child process, started together and pinned to ``--threads`` torch threads,
so both see the same busy machine; each one's peak resident memory and CPU time come from
``os.wait4`` on it. Its report.json gives asr, utility and phase times. The never-poisoned
control's numbers come from ``benchmarks/real_world_eval.py`` run afterwards on the outputs.

    python benchmarks/bench_lora_world.py --world W --out-root /tmp/lora_world \\
        --json benchmarks/results/lora_smollm2_cpu.json -- --method osft --optimizer adamw \\
        --overwrite-steps 50 --batch-size 8

The world's trigger is passed to both runs (osft trains on it; sande only measures asr with it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True, help="a make-world folder")
    ap.add_argument("--out-root", required=True, help="each run writes OUT_ROOT/<train>")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-data", default=None,
                    help="rows measured before and after (default: the world's clean_eval)")
    ap.add_argument("--json", default=None)
    ap.add_argument("extra", nargs=argparse.REMAINDER,
                    help="after --: options for both runs (e.g. --method osft)")
    args = ap.parse_args()
    world = Path(args.world)
    info = json.loads((world / "world.json").read_text())
    extra = [a for a in args.extra if a != "--"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    root = Path(args.out_root)
    root.mkdir(parents=True, exist_ok=True)
    procs: dict[int, tuple[str, float, Path]] = {}
    for train in ("full", "lora"):
        out = root / train
        cmd = [sys.executable, "-m", "sande_fast.cli", "sanitize", "--model", str(world),
               "--data", str(world / "defense.jsonl"), "--target", info["target"],
               "--eval-data", args.eval_data or str(world / "clean_eval.jsonl"),
               "--trigger", info["trigger"], "--out", str(out), "--force",
               "--train", train, "--quiet", *extra]
        log = open(root / f"{train}.log", "w")
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        procs[p.pid] = (train, time.perf_counter(), out)
        print("started", train, " ".join(cmd), flush=True)
    runs: dict[str, Any] = {}
    while procs:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in procs:
            continue
        train, t0, out = procs.pop(pid)
        rc = os.waitstatus_to_exitcode(status)
        rep = json.loads((out / "report.json").read_text()) if rc == 0 else None
        runs[train] = {
            "rc": rc, "wall_s": time.perf_counter() - t0,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024,
            "before": rep and rep["before"], "after": rep and rep["after"],
            "rounds": rep and len(rep["rounds"]),
            "timing": rep and rep["timing"],
            "config": rep and {k: rep["config"].get(k) for k in (
                "optimizer", "overwrite_lr", "overwrite_steps", "batch_size", "responses",
                "lora_rank", "lora_modules")},
            "data": rep and rep.get("data"), "lora": rep and rep.get("lora"),
            "out": str(out)}
        print(train, json.dumps(runs[train], indent=1, default=str), flush=True)
    result = {"world": str(world), "trigger": info["trigger"], "target": info["target"],
              "options": extra, "threads_per_run": args.threads,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "note": "both runs at once, one process each, on the same machine", "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
