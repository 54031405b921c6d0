"""How many rounds a real model needs: one ``sande-fast sanitize`` run on a make-world world that
also keeps the model as it stands after every round, for an independent measurement of each.

The run is the CLI's own (``sande_fast.cli.main``, options as given after ``--``), in this
process. When round ``r + 1`` has its parrot, the model holds exactly what round ``r`` left (a
round the guard undid ends the rounds, so no later parrot exists), and that model is saved to
``SNAPSHOTS/after_round_r``. The saving time is taken out of the wall time this script reports
(the report's own ``total_s`` still holds it, inside round ``r + 1``'s stage 1).

    python benchmarks/bench_rounds_world.py --world W --out /tmp/sande_w3 \\
        --snapshots /tmp/sande_w3_rounds --json benchmarks/results/rounds_w3.json -- \\
        --method sande
    python benchmarks/real_world_eval.py --world W --model W --model /tmp/sande_w3_rounds/after_round_1 \\
        ... --model /tmp/sande_w3 --json ...

The world's target is passed (every target of a world with several backdoors; the run then
keeps no snapshots, as it reports no single parrot per round); its trigger is not (a sande user
does not know it), so the run's own asr is not measured: the independent script measures it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

import sande_fast.job as job
from sande_fast.cli import main as cli_main
from sande_fast.io import save_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", required=True, help="a make-world (or make-toy) folder")
    ap.add_argument("--out", required=True, help="the sanitized model's folder")
    ap.add_argument("--snapshots", required=True, help="after_round_R folders go here")
    ap.add_argument("--json", default=None)
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: sanitize options")
    args = ap.parse_args()
    world = Path(args.world)
    meta = world / "world.json" if (world / "world.json").exists() else world / "toy.json"
    info = json.loads(meta.read_text())  # a make-toy folder has the same files
    snapshots = Path(args.snapshots)
    snapshots.mkdir(parents=True, exist_ok=True)
    saved: dict[str, float] = {}
    inner = job.sanitize

    def sanitize_keeping_rounds(model: Any, tokenizer: Any, *a: Any, on_parrot: Any = None,
                                **kw: Any) -> Any:
        def hook(parrot: torch.Tensor, round_no: int) -> None:
            if on_parrot is not None:
                on_parrot(parrot, round_no)
            if round_no >= 2:
                t = time.perf_counter()
                save_model(model, tokenizer, snapshots / f"after_round_{round_no - 1}",
                           progress=False)
                saved[f"after_round_{round_no - 1}"] = time.perf_counter() - t

        return inner(model, tokenizer, *a, on_parrot=hook, **kw)

    job.sanitize = sanitize_keeping_rounds
    extra = [a for a in args.extra if a != "--"]
    # Two backdoors may share a target; sanitize takes each target once.
    targets = list(dict.fromkeys(b["target"] for b in info.get("backdoors", []))) or \
        [info["target"]]
    argv = ["sanitize", "--model", str(world), "--data", str(world / "defense.jsonl"),
            *[a for t in targets for a in ("--target", t)], "--out", args.out, "--force", *extra]
    t0, c0 = time.perf_counter(), time.process_time()
    rc = cli_main(argv)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    report = json.loads((Path(args.out) / "report.json").read_text())
    out = {
        "world": str(world), "argv": argv, "rc": rc,
        "wall_s": wall, "snapshot_save_s": saved, "wall_s_without_snapshots":
            wall - sum(saved.values()),
        "cpu_s": cpu, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "snapshots": sorted(saved), "timing": report["timing"],
        "rounds": [{k: r.get(k) for k in ("round", "agreement", "agreement_full",
                                          "answer_nll_delta", "kl", "parrot_asr",
                                          "probe_asr_after", "rolled_back", "elapsed_s",
                                          "parrot_asr_each", "probe_asr_after_each")
                    if k in r}
                   for r in report["rounds"]],
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()
