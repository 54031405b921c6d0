"""Crashes, interrupts and numerical failures lose nothing: --out is complete or absent, the input
model is never modified, and a run killed in stage 2 resumes from its saved stage-1 parrot."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TRIGGER, leftovers, sanitize_argv
from sande_fast.cli import main
from sande_fast.io import atomic_dir, load_parrot, save_parrot


def _tree_hash(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _resume(out: Path) -> Path:
    return out.parent / f"{out.name}.parrot.safetensors"


# ------------------------------------------------------------------------------ signals

def _start(argv: list[str]) -> subprocess.Popen[str]:
    # SIGINT could be ignored when pytest itself runs in the background; a run must see it.
    return subprocess.Popen([sys.executable, "-m", "sande_fast", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen[str], ready: Any, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.communicate()[1]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the run did not reach the expected stage in time")
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code, stage", [(signal.SIGINT, 130, 2), (signal.SIGTERM, 143, 1)])
def test_interrupt_leaves_no_partial_output(sig: signal.Signals, code: int, stage: int,
                                            model_dir: Path, data_file: Path,
                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = _tree_hash(model_dir)
    if stage == 1:  # a long stage 1: signal once the output's temp folder exists
        argv = sanitize_argv(model_dir, data_file, out, "--simulate-steps", "1000000")
        ready = lambda: bool(leftovers(out))  # noqa: E731
    else:  # a long stage 2: signal once the stage-1 parrot is saved for resume
        argv = sanitize_argv(model_dir, data_file, out, "--overwrite-steps", "1000000")
        ready = lambda: _resume(out).exists()  # noqa: E731
    proc = _start(argv)
    _wait_for(proc, ready)
    time.sleep(0.3)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert not out.exists()
    assert leftovers(out) == []
    assert _tree_hash(model_dir) == before
    if stage == 2:
        with safe_open(str(_resume(out)), framework="pt") as f:
            assert json.loads(f.metadata()["round"]) == 1
        assert "--parrot" in err, "the user is told how to resume"
    else:
        assert not _resume(out).exists()


# ------------------------------------------------------------------------------ non-finite

@pytest.fixture(scope="module")
def nan_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with NaN in its final norm: every loss is NaN from the first step."""
    d = tmp_path_factory.mktemp("nan") / "model"
    shutil.copytree(model_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], float("nan"))
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


@pytest.mark.parametrize("case, method, extra, where", [
    ("osft lr", "osft", ["--trigger", TRIGGER, "--overwrite-lr", "1e30", "--overwrite-steps", "3"],
     "overwrite step"),
    ("sande stage 2", "sande", ["--overwrite-lr", "1e30", "--overwrite-steps", "3"],
     "eliminate r1 step"),
    # RMSNorm maps even a huge parrot row to ~0, so a large --simulate-lr is no reliable way to
    # break stage 1; NaN weights are.
    ("sande stage 1", "sande", [], "simulate r1 step 1"),
])
def test_non_finite_loss_stops_cleanly(case: str, method: str, extra: list[str], where: str,
                                       model_dir: Path, nan_model: Path, data_file: Path,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = nan_model if case == "sande stage 1" else model_dir
    before = _tree_hash(model)
    out = tmp_path / "out"
    rc = main(sanitize_argv(model, data_file, out, *extra, method=method))
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert where in lines[0] and "not finite" in lines[0], lines[0]
    assert not out.exists() and leftovers(out) == []
    assert _tree_hash(model) == before
    if case == "sande stage 2":  # stage 1 finished: its parrot is kept for a resume
        assert _resume(out).exists() and f"--parrot {_resume(out)}" in lines[0]
    else:
        assert not _resume(out).exists()


def test_absurd_learning_rate_is_bad_input(model_dir: Path, data_file: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Beyond ~3e37 Adam's own step size overflows float32 (an internal crash): refused first."""
    out = tmp_path / "out"
    assert main(sanitize_argv(model_dir, data_file, out, "--simulate-lr", "3e38")) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--simulate-lr" in err
    assert not out.exists()


def test_input_model_untouched_by_a_good_run(model_dir: Path, data_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree_hash(model_dir)
    assert main(sanitize_argv(model_dir, data_file, tmp_path / "out", method="sft")) == 0
    capsys.readouterr()
    assert _tree_hash(model_dir) == before


# ------------------------------------------------------------------------------ resume

def test_resume_from_the_stage1_parrot(model_dir: Path, data_file: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that dies in stage 2 keeps its parrot; a rerun with --parrot skips stage 1."""
    import sande_fast.recipe as recipe

    out = tmp_path / "out"

    def dies(*a: Any, **k: Any) -> list[float]:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(recipe, "eliminate", dies)
        assert main(sanitize_argv(model_dir, data_file, out)) == 130
    assert "resume with --parrot" in capsys.readouterr().err
    assert not out.exists() and leftovers(out) == []
    saved = load_parrot(_resume(out), 32)
    assert saved.shape == (6, 32) and bool(torch.isfinite(saved).all())

    assert main(sanitize_argv(model_dir, data_file, out, "--parrot", str(_resume(out)))) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert "simulate_r1" not in report["curves"], "stage 1 of round 1 was skipped"
    assert "eliminate_r1" in report["curves"]
    assert torch.equal(load_file(str(out / "parrot.safetensors"))["parrot"], saved)
    assert not _resume(out).exists(), "the resume file is removed once --out is complete"


def test_rerun_without_parrot_is_told_about_the_saved_one(model_dir: Path, data_file: Path,
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    out = tmp_path / "out"
    save_parrot(torch.zeros(6, 32), _resume(out), round=1)
    argv = [a for a in sanitize_argv(model_dir, data_file, out) if a != "--quiet"]
    assert main(argv + ["--simulate-steps", "1", "--overwrite-steps", "1"]) == 0
    assert f"--parrot {_resume(out)}" in capsys.readouterr().err


# ------------------------------------------------------------------------------ atomic files

def test_atomic_dir_keeps_the_old_output_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_dir(out, force=True) as tmp:
                (tmp / "b").write_text("new")
                raise exc
        assert [p.name for p in out.iterdir()] == ["a"] and leftovers(out) == []
    with atomic_dir(out, force=True) as tmp:
        (tmp / "b").write_text("new")
    assert [p.name for p in out.iterdir()] == ["b"] and leftovers(out) == []


def test_atomic_dir_defers_a_signal_during_clean_up(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C during the clean-up must not leave the temp folder behind."""
    import sande_fast.io as io

    real_rmtree = shutil.rmtree
    calls = []

    def rmtree_interrupted(path: Any, *a: Any, **k: Any) -> None:
        calls.append(path)
        os.kill(os.getpid(), signal.SIGINT)  # arrives while cleaning up
        time.sleep(0.05)
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(io.shutil, "rmtree", rmtree_interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "x").write_text("partial")
            raise RuntimeError("crash")
    assert calls and not out.exists() and leftovers(out) == []


def test_save_parrot_replaces_atomically(tmp_path: Path) -> None:
    p = tmp_path / "p.safetensors"
    save_parrot(torch.ones(2, 4), p, round=1)
    save_parrot(torch.full((3, 4), 2.0), p, round=2)
    assert torch.equal(load_parrot(p, 4), torch.full((3, 4), 2.0))
    assert [x.name for x in tmp_path.iterdir()] == ["p.safetensors"]
    save_file({"parrot": torch.zeros(2, 4, dtype=torch.float64)}, str(tmp_path / "d.safetensors"))
    assert load_parrot(tmp_path / "d.safetensors", 4).dtype == torch.float32
