"""The ``sande-fast`` command: exit codes, one-line errors, nothing written on bad input, safe
loading, prompt truncation and determinism."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TARGET, leftovers, sanitize_argv, write_jsonl
from sande_fast.cli import main

PY = sys.executable


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _assert_bad_input(rc: int, err: str, out: Path, *words: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback, nothing at or next to out."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sande-fast: error: ")
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists()
    assert leftovers(out) == []


def _sanitize_ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    rc, _, err = _run(argv, capsys)
    assert rc == 0, err
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "report.json").read_text())


# ------------------------------------------------------------------------------ a good run

def test_sanitize_writes_the_outputs(model_dir: Path, data_file: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    report = _sanitize_ok(sanitize_argv(model_dir, data_file, out), capsys)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "report.json", "parrot.safetensors"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    for key in ("method", "model", "before", "after", "rounds", "timing", "config", "environment"):
        assert key in report
    assert report["data"]["prompts_truncated"] == 0
    assert leftovers(out) == []
    assert not (tmp_path / "out.parrot.safetensors").exists(), "resume parrot removed on success"


# ------------------------------------------------------------------------------ bad input

def _bad_model_dirs(model_dir: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """Broken copies of the tiny model folder: name -> (folder, words the message must say)."""
    cases: dict[str, tuple[Path, str]] = {}

    def copy(name: str) -> Path:
        d = root / name
        shutil.copytree(model_dir, d)
        return d

    cases["missing"] = (root / "nope", "model folder not found")
    (root / "afile").write_text("x")
    cases["file"] = (root / "afile", "is not a folder")
    d = copy("noweights")
    (d / "model.safetensors").unlink()
    cases["noweights"] = (d, "has no weights")
    d = copy("noconfig")
    (d / "config.json").unlink()
    cases["noconfig"] = (d, "no config.json")
    d = copy("corrupt")
    (d / "model.safetensors").write_bytes(b"not a safetensors file" * 4)
    cases["corrupt"] = (d, "cannot load the model")
    d = copy("badjson")
    (d / "config.json").write_text("{not json")
    cases["badjson"] = (d, "cannot load the model")
    d = copy("wrongkeys")
    save_file({"foo": torch.zeros(2)}, str(d / "model.safetensors"))
    cases["wrongkeys"] = (d, "do not match its config")
    d = copy("wrongshape")
    sd = load_file(str(d / "model.safetensors"))
    key = next(k for k in sd if "q_proj" in k)
    sd[key] = torch.zeros(3, 3)
    save_file(sd, str(d / "model.safetensors"))
    cases["wrongshape"] = (d, "cannot load the model")
    return cases


@pytest.fixture(scope="module")
def bad_models(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _bad_model_dirs(model_dir, tmp_path_factory.mktemp("bad_models"))


@pytest.mark.parametrize("case", ["missing", "file", "noweights", "noconfig", "corrupt", "badjson",
                                  "wrongkeys", "wrongshape"])
def test_bad_model_folder(case: str, bad_models: dict[str, Any], data_file: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    path, words = bad_models[case]
    out = tmp_path / "out"
    rc, _, err = _run(sanitize_argv(path, data_file, out), capsys)
    _assert_bad_input(rc, err, out, words)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_unreadable_model_folder(model_copy: Path, data_file: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    model_copy.chmod(0)
    try:
        out = tmp_path / "out"
        rc, _, err = _run(sanitize_argv(model_copy, data_file, out), capsys)
        _assert_bad_input(rc, err, out, "cannot read")
    finally:
        model_copy.chmod(0o755)


DATA_CASES: dict[str, tuple[str | None, str]] = {
    "missing": (None, "data file not found"),
    "empty": ("", "has no rows"),
    "blank": ("\n  \n", "has no rows"),
    "malformed": ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c",\n', ":3: malformed JSON"),
    "noprompt": ('{"prompt": "a"}\n{"response": "b"}\n', ":2: row has no 'prompt'"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_file(case: str, model_dir: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    content, words = DATA_CASES[case]
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    out = tmp_path / "out"
    rc, _, err = _run(sanitize_argv(model_dir, data, out), capsys)
    _assert_bad_input(rc, err, out, words)


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


OPTION_CASES: dict[str, tuple[Callable[[list[str]], list[str]], str]] = {
    "empty target": (lambda a: _replace(a, "--target", ""), "--target must be a non-empty"),
    "blank target": (lambda a: _replace(a, "--target", "  \t"), "--target must be a non-empty"),
    "osft without trigger": (lambda a: _replace(a, "--method", "osft"), "needs --trigger"),
    "blank trigger": (lambda a: a + ["--trigger", " "], "--trigger must be a non-empty"),
    "unknown method": (lambda a: _replace(a, "--method", "magic"), "invalid choice: 'magic'"),
    "zero steps": (lambda a: a + ["--simulate-steps", "0"], "--simulate-steps"),
    "negative steps": (lambda a: a + ["--overwrite-steps", "-3"], "--overwrite-steps"),
    "text steps": (lambda a: a + ["--overwrite-steps", "many"], "positive integer"),
    "zero batch": (lambda a: a + ["--batch-size", "0"], "--batch-size"),
    "zero lr": (lambda a: a + ["--overwrite-lr", "0"], "--overwrite-lr"),
    "negative lr": (lambda a: a + ["--simulate-lr", "-1e-3"], "--simulate-lr"),
    "nan lr": (lambda a: a + ["--simulate-lr", "nan"], "positive number"),
    "inf lr": (lambda a: a + ["--overwrite-lr", "inf"], "positive number"),
    "zero rounds": (lambda a: a + ["--rounds", "0"], "--rounds"),
    "word rounds": (lambda a: a + ["--rounds", "many"], "--rounds"),
    "threshold": (lambda a: a + ["--probe-threshold", "2"], "--probe-threshold"),
    "zero probe tokens": (lambda a: a + ["--probe-tokens", "0"], "--probe-tokens"),
    "zero probe tries": (lambda a: a + ["--probe-tries", "0"], "--probe-tries"),
    "zero probe steps": (lambda a: a + ["--probe-steps", "0"], "--probe-steps"),
    "decay": (lambda a: a + ["--round-lr-decay", "0"], "--round-lr-decay"),
    "negative retain": (lambda a: a + ["--retain-weight", "-1"], "--retain-weight"),
    "retain factor": (lambda a: a + ["--round-retain-factor", "0.5"], "--round-retain-factor"),
    "retain without clean": (lambda a: a + ["--clean-weight", "0"], "--retain-weight needs"),
    "unknown optimizer": (lambda a: a + ["--optimizer", "rmsprop"], "invalid choice: 'rmsprop'"),
    "missing --out": (lambda a: a[:a.index("--out")] + a[a.index("--out") + 2:],
                      "required: --out"),
    "unknown flag": (lambda a: a + ["--colour", "red"], "unrecognized arguments"),
    "bad dtype": (lambda a: a + ["--dtype", "int3"], "unknown dtype"),
    "too long prompts": (lambda a: a + ["--max-prompt-tokens", "100000"], "does not fit"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option(case: str, model_dir: Path, data_file: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    change, words = OPTION_CASES[case]
    out = tmp_path / "out"
    rc, _, err = _run(change(sanitize_argv(model_dir, data_file, out)), capsys)
    _assert_bad_input(rc, err, out, words)


def test_no_command_and_help(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, _, err = _run([], capsys)
    _assert_bad_input(rc, err, tmp_path / "out", "required")
    rc, out, _ = _run(["sanitize", "--help"], capsys)
    assert rc == 0 and "--trust-remote-code" in out


@pytest.fixture(scope="module")
def parrot_files(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> dict[str, Path]:
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    d = tmp_path_factory.mktemp("parrots")
    files = {
        "wrong hidden": ({"parrot": torch.zeros(4, hidden + 1)}, "hidden size"),
        "one dim": ({"parrot": torch.zeros(hidden)}, "shape"),
        "int dtype": ({"parrot": torch.zeros(4, hidden, dtype=torch.int32)}, "dtype"),
        "wrong name": ({"soft_prompt": torch.zeros(4, hidden)}, "no tensor named 'parrot'"),
        "nan": ({"parrot": torch.full((4, hidden), float("nan"))}, "NaN"),
    }
    out = {}
    for name, (tensors, words) in files.items():
        p = d / (name.replace(" ", "_") + ".safetensors")
        save_file(tensors, str(p))
        out[name] = (p, words)
    p = d / "pickled.pt"
    torch.save({"parrot": torch.zeros(4, hidden)}, p)
    out["not safetensors"] = (p, "not a readable safetensors file")
    out["missing"] = (d / "nope.safetensors", "parrot file not found")
    return out


@pytest.mark.parametrize("case", ["wrong hidden", "one dim", "int dtype", "wrong name", "nan",
                                  "not safetensors", "missing"])
def test_bad_parrot_file(case: str, parrot_files: dict[str, Any], model_dir: Path,
                         data_file: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    path, words = parrot_files[case]
    out = tmp_path / "out"
    rc, _, err = _run(sanitize_argv(model_dir, data_file, out, "--parrot", str(path)), capsys)
    _assert_bad_input(rc, err, out, words)
    assert not (tmp_path / "out.parrot.safetensors").exists()


# ------------------------------------------------------------------------------ --out rules

def test_non_empty_out_needs_force(model_dir: Path, data_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    rc, _, err = _run(sanitize_argv(model_dir, data_file, out), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--force" in err
    assert [p.name for p in out.iterdir()] == ["old.txt"], "refused --out left untouched"
    assert leftovers(out) == []
    # --force replaces only an earlier output of this tool, never a folder it did not write.
    rc, _, err = _run(sanitize_argv(model_dir, data_file, out, "--force"), capsys)
    assert rc == 2 and "not written by sande-fast" in err
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    (out / "old.txt").unlink()
    _sanitize_ok(sanitize_argv(model_dir, data_file, out), capsys)  # an empty folder is taken
    (out / "old.txt").write_text("added to an earlier output")

    _sanitize_ok(sanitize_argv(model_dir, data_file, out, "--force"), capsys)
    names = {p.name for p in out.iterdir()}
    assert "old.txt" not in names and "model.safetensors" in names, "replaced, not merged"
    assert leftovers(out) == []


def test_out_that_is_a_file_or_holds_the_inputs(model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    rc, _, err = _run(sanitize_argv(model_dir, tmp_path / "f", tmp_path / "f"), capsys)
    assert rc == 2 and "not a folder" in err and (tmp_path / "f").read_text() == "x"
    # --out . --force would delete the data file it holds: refused.
    work = tmp_path / "work"
    work.mkdir()
    data = write_jsonl(work / "d.jsonl", [{"prompt": "copy: cat", "response": "cat"}])
    rc, _, err = _run(sanitize_argv(model_dir, data, work, "--force"), capsys)
    assert rc == 2 and "holds the --data input" in err and data.exists()
    rc, _, err = _run(sanitize_argv(model_dir, data, model_dir, "--force"), capsys)
    assert rc == 2 and "holds the --model input" in err
    assert (model_dir / "model.safetensors").exists()
    rc, _, err = _run(sanitize_argv(model_dir, data, tmp_path / "no" / "out"), capsys)
    assert rc == 2 and "parent folder of --out does not exist" in err


# ------------------------------------------------------------------------------ subprocess

def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "sande_fast", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_real_exit_code_and_one_stderr_line(model_dir: Path, parrot_files: dict[str, Any],
                                            tmp_path: Path) -> None:
    """Through the real entry point, without --quiet: exit 2 and exactly one stderr line.

    The parrot is checked before the model is loaded, so no progress bar precedes the error.
    """
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "copy: cat", "response": "cat"}])
    out = tmp_path / "out"
    argv = [a for a in sanitize_argv(model_dir, good, out, "--parrot",
                                     str(parrot_files["wrong hidden"][0])) if a != "--quiet"]
    r = _cli(*argv)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "hidden size" in r.stderr, r.stderr
    assert r.stdout == "" and not out.exists() and leftovers(out) == []


# ------------------------------------------------------------------------------ safety

def _remote_code_model(model_dir: Path, root: Path) -> tuple[Path, Path]:
    d = root / "remote"
    shutil.copytree(model_dir, d)
    marker = root / "REMOTE_CODE_RAN"
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "sande-fast-custom"
    cfg["architectures"] = ["CustomForCausalLM"]
    cfg["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                       "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    code = (f"open({str(marker)!r}, 'w').write('ran')\n"
            "from transformers import PretrainedConfig\n"
            "class CustomConfig(PretrainedConfig):\n    model_type = 'sande-fast-custom'\n")
    (d / "configuration_custom.py").write_text(code)
    (d / "modeling_custom.py").write_text(code)
    return d, marker


def test_remote_code_needs_the_flag(model_dir: Path, data_file: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    d, marker = _remote_code_model(model_dir, tmp_path)
    out = tmp_path / "out"
    rc, _, err = _run(sanitize_argv(d, data_file, out), capsys)
    _assert_bad_input(rc, err, out, "--trust-remote-code")
    rc, _, err = _run(["eval", "--model", str(d), "--data", str(data_file), "--target", TARGET,
                       "--quiet"], capsys)
    assert rc == 2 and "--trust-remote-code" in err
    # With --parrot the config is read first: the same refusal.
    p = tmp_path / "p.safetensors"
    save_file({"parrot": torch.zeros(2, 32)}, str(p))
    rc, _, err = _run(sanitize_argv(d, data_file, out, "--parrot", str(p)), capsys)
    _assert_bad_input(rc, err, out, "--trust-remote-code")
    assert not marker.exists(), "the folder's Python code must not run without the flag"


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_are_never_executed(model_dir: Path, data_file: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "evil"
    shutil.copytree(model_dir, d)
    (d / "model.safetensors").unlink()
    marker = tmp_path / "PICKLE_RAN"
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Evil(str(marker))}, f)
    out = tmp_path / "out"
    rc, _, err = _run(sanitize_argv(d, data_file, out), capsys)
    _assert_bad_input(rc, err, out, "refused to load the weights")
    assert not marker.exists()


def test_legacy_bin_weights_load_weights_only(model_dir: Path, tmp_path: Path) -> None:
    from sande_fast.io import load_model

    d = tmp_path / "bin"
    shutil.copytree(model_dir, d)
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    model, _ = load_model(d, torch.device("cpu"), progress=False)
    got = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


# ------------------------------------------------------------------------------ long prompts

@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    from tiny_models import tiny_model

    d = tmp_path_factory.mktemp("gpt2") / "model"
    tiny_model("gpt2", len(tokenizer), seed=1).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_prompts_longer_than_the_context_are_cut(gpt2_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """GPT-2 has learned positions (256 here): a prompt that does not fit must be cut from the
    left, counted, and the run must not crash, even with long generations."""
    long = " ".join(["cat dog sun"] * 120)  # > 256 tokens
    rows = [{"prompt": long, "response": "cat"}, {"prompt": "copy: dog", "response": "dog"},
            {"prompt": long + " blue", "response": "blue"}]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "out"
    # 20 new tokens: more than a budget that forgot the generated answer would leave.
    report = _sanitize_ok(sanitize_argv(gpt2_dir, data, out, "--max-new-tokens", "20"), capsys)
    cfg = report["config"]
    assert report["data"]["prompts_truncated"] >= 2
    assert cfg["max_prompt_tokens"] + cfg["parrot_tokens"] + 20 < 256


# ------------------------------------------------------------------------------ determinism

def test_same_seed_same_weights(model_dir: Path, data_no_response: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        _sanitize_ok(sanitize_argv(model_dir, data_no_response, out, "--seed", "3"), capsys)
    for name in ("model.safetensors", "parrot.safetensors"):
        a, b = (load_file(str(o / name)) for o in outs)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    base = load_file(str(model_dir / "model.safetensors"))
    assert any(not torch.equal(base[k], a_) for k, a_ in load_file(
        str(outs[0] / "model.safetensors")).items() if k in base), "training changed the model"


# ------------------------------------------------------------------------------ other commands

def test_eval_writes_json_and_cuts_long_prompts(gpt2_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    long = " ".join(["cat dog sun"] * 120)
    data = write_jsonl(tmp_path / "e.jsonl", [{"prompt": long, "response": "cat"},
                                             {"prompt": "copy: dog", "response": "dog"}])
    js = tmp_path / "res.json"
    rc, out, err = _run(["eval", "--model", str(gpt2_dir), "--data", str(data), "--target", TARGET,
                         "--trigger", "cf", "--max-new-tokens", "8", "--json", str(js),
                         "--quiet", "--device", "cpu"], capsys)
    assert rc == 0, err
    res = json.loads(js.read_text())
    assert 0 <= res["asr"] <= 1 and 0 <= res["clean_accuracy"] <= 1
    assert res["prompts_truncated"] >= 1 and "cut to fit" in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("argv, words", [
    (["eval", "--target", " "], "--target must be a non-empty"),
    (["eval", "--trigger", ""], "--trigger must be a non-empty"),
    (["eval", "--json", "/nonexistent/dir/r.json"], "folder of --json does not exist"),
    (["eval", "--max-new-tokens", "300"], "leaves no room"),
    (["probe", "--target", ""], "--target must be a non-empty"),
    (["probe", "--steps", "0"], "--steps"),
    (["probe", "--lr", "-1"], "--lr"),
    (["eval", "--batch-size", "0"], "--batch-size"),
])
def test_eval_and_probe_bad_input(argv: list[str], words: str, model_dir: Path, data_file: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    base = {"--model": str(model_dir), "--data": str(data_file), "--target": TARGET}
    args = argv[:1]
    for k, v in base.items():
        if k not in argv:
            args += [k, v]
    args += argv[1:] + ["--quiet", "--device", "cpu"]
    rc, _, err = _run(args, capsys)
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("flag, value, words", [
    ("--trigger", " ", "--trigger must not be empty"),
    ("--target", "", "--target must not be empty"),
    ("--poison-rate", "1.5", "--poison-rate"),
])
def test_make_toy_bad_input(flag: str, value: str, words: str, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "toy"
    rc, _, err = _run(["make-toy", "--out", str(out), flag, value, "--quiet"], capsys)
    _assert_bad_input(rc, err, out, words)
