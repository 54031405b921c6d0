"""The command line's log: ``--log-level``, ``--log-file`` headed by the run's options, third-party
warnings as one line each, and the runs that go on without matplotlib."""
from __future__ import annotations

import importlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from conftest import TARGET, leftovers, sanitize_argv
from sande_fast.cli import build_parser, main


def _eval_argv(model: Path, data: Path, *extra: str) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(data), "--target", TARGET,
            "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu", *extra]


def _line(lines: list[str], word: str) -> str:
    found = [line for line in lines if word in line]
    assert len(found) == 1, (word, lines)
    return found[0]


def _json_after(line: str, head: str) -> Any:
    return json.loads(line.split(f" {head}", 1)[1])


def _noisy_eval(monkeypatch: pytest.MonkeyPatch, emit: Any) -> None:
    """``eval`` calls ``emit()`` once, after the model is loaded."""
    evaluate = importlib.import_module("sande_fast.utility")
    real = evaluate.evaluate_model

    def noisy(*a: Any, **k: Any) -> Any:
        emit()
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "evaluate_model", noisy)


def _hf_warning(text: str) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers.modeling_utils").warning(text)


def test_every_command_takes_the_logging_flags() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        flags = {f for a in p._actions for f in a.option_strings}
        assert {"--log-level", "--log-file"} <= flags, name


def test_log_file_starts_with_the_config_and_gets_the_run(
        model_dir: Path, data_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out, log = tmp_path / "out", tmp_path / "run.log"
    assert main(sanitize_argv(model_dir, data_file, out, "--log-file", str(log))) == 0
    cap = capsys.readouterr()
    assert "metric" in cap.out  # the result table stays on stdout
    assert cap.err == ""  # --quiet: nothing but errors on stderr ...
    lines = log.read_text(encoding="utf-8").splitlines()
    # ... while the file gets everything: the head first, then the run's messages.
    assert "sande-fast" in lines[0] and " sanitize " in lines[0]
    inputs = _json_after(lines[1], "inputs: ")
    assert inputs["model"] == str(model_dir) and inputs["out"] == str(out)
    config = _json_after(lines[2], "config: ")
    assert config["method"] == "sande" and config["simulate_steps"] == 2
    assert config["overwrite_lr"] is None  # as given; the resolved values follow below
    report = json.loads((out / "report.json").read_text())
    assert _json_after(_line(lines, "resolved config: "), "resolved config: ") == report["config"]
    for words in ("INFO    sande_fast.io: loaded", "round 1: parrot asr", "round 1: probe asr",
                  f"wrote {out}"):
        _line(lines, words)
    # A second run appends, headed the same way.
    assert main(sanitize_argv(model_dir, data_file, out, "--force", "--log-file", str(log))) == 0
    again = log.read_text(encoding="utf-8").splitlines()
    assert again[:len(lines)] == lines and " sanitize " in again[len(lines)]


def test_log_level_warning_hides_info(model_dir: Path, data_file: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    _noisy_eval(monkeypatch, lambda: warnings.warn("something third-party", UserWarning))
    assert main(_eval_argv(model_dir, data_file)) == 0
    err = capsys.readouterr().err
    assert f"loaded {model_dir}" in err  # info, the default level
    assert "sande-fast: warning: UserWarning: something third-party" in err
    log = tmp_path / "run.log"
    assert main(_eval_argv(model_dir, data_file, "--log-level", "warning",
                           "--log-file", str(log))) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("asr ")
    assert "loaded" not in cap.err
    assert "sande-fast: warning: UserWarning: something third-party" in cap.err
    text = log.read_text(encoding="utf-8")
    assert "loaded" not in text and "UserWarning: something third-party" in text
    assert text.splitlines()[0].endswith(")") and " eval " in text.splitlines()[0]  # the head
    # debug shows the head on stderr too
    assert main(_eval_argv(model_dir, data_file, "--log-level", "debug")) == 0
    assert "config: {" in capsys.readouterr().err


def test_transformers_warning_reaches_the_log_as_one_line(
        model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _noisy_eval(monkeypatch, lambda: _hf_warning("a deprecation\nover two lines"))
    log = tmp_path / "run.log"
    assert main(_eval_argv(model_dir, data_file, "--log-file", str(log))) == 0
    err = capsys.readouterr().err
    assert "sande-fast: warning: transformers: a deprecation over two lines\n" in err
    line = _line(log.read_text(encoding="utf-8").splitlines(), "a deprecation")
    assert "WARNING sande_fast.transformers: transformers: a deprecation over two lines" in line
    assert "over two lines" in line  # folded, not cut


def test_transformers_warning_while_loading_is_passed_on(
        model_dir: Path, data_file: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Messages held while a model loads come out once the load succeeded, except transformers'
    load report, which load_model states itself."""
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained

    def loading(*a: Any, **k: Any) -> Any:
        _hf_warning("a note while loading")
        _hf_warning("\x1b[1mLlamaForCausalLM LOAD REPORT\x1b[0m from: x\nKey | Status")
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", loading)
    assert main(_eval_argv(model_dir, data_file)) == 0
    err = capsys.readouterr().err
    assert err.count("sande-fast: warning: transformers: a note while loading\n") == 1
    assert "LOAD REPORT" not in err


@pytest.mark.parametrize("where, words", [
    ("missing/run.log", "cannot write --log-file"),
    (".", "is a folder"),
    ("data.jsonl", "--data input"),
    ("model_copy/run.log", "--model input"),
])
def test_bad_log_file_is_one_line_and_exit_2(where: str, words: str, model_copy: Path,
                                            data_file: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data.jsonl"
    data.write_bytes(data_file.read_bytes())
    assert model_copy.parent == tmp_path
    rc = main(_eval_argv(model_copy, data, "--log-file", str(tmp_path / where)))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("sande-fast: error: "), err
    assert words in err
    assert data.read_bytes() == data_file.read_bytes()
    assert not (model_copy / "run.log").exists() and not (tmp_path / "missing").exists()


def test_log_file_inside_out_is_refused(model_dir: Path, data_file: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    rc = main(sanitize_argv(model_dir, data_file, out, "--log-file", str(out / "run.log")))
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "inside --out" in err, err
    assert list(out.iterdir()) == [] and leftovers(out) == []


def test_errors_reach_the_log_file(model_dir: Path, data_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "run.log"
    argv = _eval_argv(model_dir, data_file, "--quiet", "--log-file", str(log))
    argv[argv.index("--target") + 1] = " "
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sande-fast: error: --target") and len(err.splitlines()) == 1
    assert "ERROR   sande_fast.cli: --target" in log.read_text(encoding="utf-8")


def test_sanitize_without_matplotlib_skips_the_figure(
        model_dir: Path, data_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    out, log = tmp_path / "out", tmp_path / "run.log"
    argv = [a for a in sanitize_argv(model_dir, data_file, out, "--log-file", str(log))
            if a != "--quiet"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("report.png skipped: matplotlib is not installed") == 1
    assert {"report.json", "report.md", "model.safetensors"} <= {p.name for p in out.iterdir()}
    assert not (out / "report.png").exists()
    _line(log.read_text(encoding="utf-8").splitlines(), "report.png skipped")
