"""Smoke test of benchmarks/bench_sanitize.py: the `tiny` preset on CPU writes its JSON report."""
from __future__ import annotations

import json
import math
import statistics
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_sanitize.py"

# The keys the benchmark writes for each stage (benchmarks/README.md reads them).
STAGE_KEYS = ("ours_tokens_per_s", "ref_tokens_per_s", "speedup",
              "ours_peak_mem_mb", "ref_peak_mem_mb", "mem_ratio")


@pytest.mark.timeout(120)
def test_bench_sanitize_tiny_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # One thread: on a busy 2-core machine, OpenMP threads competing with other processes can
    # make this tiny model's steps 10-50x slower; one thread keeps the test fast and stable.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--iters", "1", "--device", "cpu",
         "--threads", "1", "--retain-weight", "30", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())

    assert res["device"] == "cpu"
    # Ours carries the retention term in stage 2; anchored at the starting weights, the checked
    # first step still has the reference's loss and gradients (below).
    assert res["ours_retain_weight"] == 30
    assert res["preset"] == "tiny"
    for stage in ("stage1", "stage2"):
        r = res[stage]
        for key in STAGE_KEYS:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]) and r[key] > 0, \
                (stage, key, r.get(key))
        # The headline numbers follow from the raw step times the run recorded: one sample per
        # timed step of each side, the median of those, the user-counted tokens over it.
        for side in ("ours", "ref"):
            samples = r[f"{side}_ms_all"]
            assert len(samples) == res["iters"] and min(samples) > 0
            assert r[f"{side}_median_ms"] == statistics.median(samples)
            assert r[f"{side}_tokens_per_s"] == pytest.approx(
                r["tokens"] * 1e3 / statistics.median(samples))
        assert r["speedup"] == pytest.approx(
            statistics.median(r["ref_ms_all"]) / statistics.median(r["ours_ms_all"]))
        # Same maths on both paths (fp32 on CPU).
        assert r["loss_rel_diff"] < 1e-5, r["loss_rel_diff"]
        assert r["grad_rel_diff"] < 1e-4, r["grad_rel_diff"]
        assert r["tokens"] == res["batch"][stage]["tokens"] > 0
    # Both sides are charged the same user-counted tokens; the fast path feeds fewer rows.
    for stage in ("stage1", "stage2"):
        b = res["batch"][stage]
        assert 0 < b["ours_needed_rows"] <= b["ours_rows"] < b["ref_rows"]
    assert "table" not in res and "stage1" in proc.stdout
