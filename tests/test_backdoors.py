"""Several backdoors in one run: the command line's target lists, the per-target report and
parrot files, and one eliminate pass for all targets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import FAST_OPTS, TARGET, leftovers
from sande_fast.cli import main

SECOND = "GO AWAY"


def _argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sanitize", "--model", str(model), "--data", str(data), "--out", str(out),
            *FAST_OPTS, *extra]


def test_two_targets_write_a_report_entry_and_a_parrot_each(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(_argv(model_dir, data_file, out, "--target", TARGET, "--target", SECOND,
                    "--trigger", "cf", "--trigger", "zx"))
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    report = json.loads((out / "report.json").read_text())
    targets = report["targets"]
    assert [t["target"] for t in targets] == [TARGET, SECOND]
    assert [t["trigger"] for t in targets] == ["cf", "zx"]
    assert [t["parrot_file"] for t in targets] == ["parrot.safetensors", "parrot_2.safetensors"]
    # Each target's asr is measured with its own trigger; "asr" is the worst of them.
    each = report["after"]["asr_each"]
    assert len(each) == 2 and report["after"]["asr"] == max(each)
    assert [t["asr_after"] for t in targets] == each
    # One eliminate pass for both parrots per round, and each round probed both targets.
    assert [k for k in report["curves"] if k.startswith("eliminate")] == ["eliminate_r1"]
    assert {k for k in report["curves"] if k.startswith("simulate")} == {"simulate_r1_t1",
                                                                         "simulate_r1_t2"}
    assert len(report["rounds"][-1]["probe_asr_after_each"]) == 2
    p1 = load_file(str(out / "parrot.safetensors"))["parrot"]
    p2 = load_file(str(out / "parrot_2.safetensors"))["parrot"]
    assert p1.shape == p2.shape and not (p1 == p2).all()
    assert "worst target" in cap.out and "## Backdoors" in (out / "report.md").read_text()
    # The report times every phase of the run, loading and saving included.
    stages = report["timing"]["stages"]
    assert {"load_s", "answers_s", "prepare_s", "eval_s", "simulate_s", "eliminate_s",
            "probe_s", "save_s"} <= set(stages)
    assert all(v >= 0 for v in stages.values()) and stages["load_s"] > 0


def test_targets_file_gives_the_same_run_as_repeated_target(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    listed = tmp_path / "targets.txt"
    listed.write_text(f"{TARGET}\n{SECOND}\n", encoding="utf-8")
    reports = []
    for name, extra in (("a", ["--target", TARGET, "--target", SECOND]),
                        ("b", ["--targets", str(listed)])):
        assert main(_argv(model_dir, data_file, tmp_path / name, *extra)) == 0
        capsys.readouterr()
        reports.append(json.loads((tmp_path / name / "report.json").read_text()))
        weights = load_file(str(tmp_path / name / "model.safetensors"))
        reports[-1]["_w"] = weights
    a, b = reports
    assert a["targets"] == b["targets"]
    assert all((a["_w"][k] == b["_w"][k]).all() for k in a["_w"])


@pytest.mark.parametrize("lines, words", [
    ([TARGET, "", SECOND], ["line 2 is empty"]),
    ([TARGET, "i hate  you"], ["repeats entry 1"]),
    ([TARGET, "x" * 1001], ["1001 characters"]),
    ([], ["holds no target"]),
])
def test_a_bad_target_list_is_one_line_and_exit_2(
        lines: list[str], words: list[str], model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    listed = tmp_path / "targets.txt"
    listed.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out"
    rc = main(_argv(model_dir, data_file, out, "--targets", str(listed)))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and all(w in err[0] for w in words), err
    assert not out.exists() and leftovers(out) == []


@pytest.mark.parametrize("extra, words", [
    (["--target", TARGET, "--target", TARGET.lower()], ["repeats entry 1"]),
    (["--target", TARGET, "--target", " "], ["entry 2", "non-empty"]),
    (["--target", TARGET, "--target", SECOND, "--trigger", "cf"], ["one trigger per target"]),
    (["--target", TARGET, "--targets", "x.txt"], ["not both"]),
])
def test_bad_repeated_targets_are_refused(extra: list[str], words: list[str], model_dir: Path,
                                          data_file: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(_argv(model_dir, data_file, out, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and all(w in err[0] for w in words), err
    assert not out.exists()


def test_osft_takes_several_triggers(model_dir: Path, data_file: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(_argv(model_dir, data_file, out, "--method", "osft", "--target", TARGET,
                    "--trigger", "cf", "--trigger", "zx"))
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert [t["trigger"] for t in report["targets"]] == ["cf", "zx"]
    assert [t["target"] for t in report["targets"]] == [TARGET, TARGET]


def test_probe_reports_each_target_and_the_worst(model_dir: Path, data_file: Path,
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from sande_fast import probe
    from sande_fast.io import load_model
    import torch

    js = tmp_path / "probe.json"
    rc = main(["probe", "--model", str(model_dir), "--data", str(data_file), "--target", TARGET,
               "--target", SECOND, "--steps", "3", "--tries", "2", "--eval-rows", "4",
               "--max-new-tokens", "4", "--quiet", "--device", "cpu", "--json", str(js)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(js.read_text())
    assert [r["target"] for r in res["targets"]] == [TARGET, SECOND]
    assert res["probe_asr_max"] == max(r["probe_asr_max"] for r in res["targets"])
    assert res["worst_target"] in (TARGET, SECOND)
    # Each target's entry is the single-target probe with the same options (the targets'
    # parrots train in one pass, each exactly as alone).
    model, tok = load_model(model_dir, torch.device("cpu"))
    one = probe(model, tok, str(data_file), SECOND, steps=3, tries=2, eval_rows=4,
                max_new_tokens=4, quiet=True, device="cpu")
    assert res["targets"][1]["probe_asr"] == one["probe_asr"]
    assert res["targets"][1]["final_loss"] == pytest.approx(one["final_loss"], rel=1e-6)
