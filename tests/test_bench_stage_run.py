"""Smoke test of benchmarks/bench_stage_run.py: two short runs per stage write their report, and
the two sides' loss curves agree."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_stage_run.py"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage,layout", [(1, "small"), (2, "chat")])
def test_bench_stage_run_writes_its_report(tmp_path: Path, stage: int, layout: str) -> None:
    out = tmp_path / "run.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--stage", str(stage), "--layout", layout, "--steps", "2",
         "--rows", "3", "--batch", "3", "--threads", "1", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["stage"] == stage and report["steps"] == 2
    assert report["cpu_s_on"] > 0 and report["cpu_s_off"] > 0
    assert report["loss_max_rel_diff"] < 1e-4
    if stage == 1:
        assert report["cache"]["prompt_forwards"] >= 1
