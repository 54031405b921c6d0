"""One AdamW step on a model's parameter shapes: PyTorch's default (multi-tensor) path against
the fused kernel ``make_optimizer`` picks, in process CPU time and wall time.

    python benchmarks/bench_optimizer.py --json benchmarks/results/optimizer_smollm2_cpu.json

The shapes are SmolLM2-135M-Instruct's (30 layers, hidden 576, intermediate 1536, 9 / 3
heads, vocabulary 49152, tied embeddings), randomly initialised; gradients are random too.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from sande_fast.steps import make_optimizer


def smollm2_shapes() -> list[tuple[int, ...]]:
    h, inter, layers, kv = 576, 1536, 30, 192
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    return [(49152, h)] + per_layer * layers + [(h,)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in smollm2_shapes()]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    sides = {"default": lambda ps: torch.optim.AdamW(ps, lr=2e-5),
             "ours (fused)": lambda ps: make_optimizer("adamw", ps, lr=2e-5)}
    out: dict = {"params": sum(p.numel() for p in params), "steps": args.steps, "sides": {},
                 "machine": {"cpu": platform.processor() or platform.machine(),
                             "cores": os.cpu_count(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(),
                             "load_avg_1m": os.getloadavg()[0]}}
    for name, build in sides.items():
        opt = build(params)
        opt.step()  # state allocated outside the timing
        cpu, wall = [], []
        for _ in range(args.steps):
            c, w = time.process_time(), time.perf_counter()
            opt.step()
            cpu.append(time.process_time() - c)
            wall.append(time.perf_counter() - w)
        out["sides"][name] = {"cpu_s_median": statistics.median(cpu),
                              "wall_s_median": statistics.median(wall),
                              "fused": bool(opt.defaults.get("fused"))}
        del opt
    d, f = out["sides"]["default"], out["sides"]["ours (fused)"]
    out["speedup_cpu_time"] = d["cpu_s_median"] / f["cpu_s_median"]
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
