"""The fix as a reviewable patch: ``sanitize --save-patch`` and ``apply-patch`` reproduce the
sanitized weights bit for bit, refuse a patch that does not fit, and the statistics are right."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import folder_weights, sanitize_argv
from sande_fast.cli import main
from sande_fast.errors import BadInputError
from sande_fast.patch import (Patch, apply_patch, load_patch, make_patch, patch_stats,
                              tensors_digest)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _bf16(model_dir: Path, dst: Path) -> Path:
    from sande_fast.io import load_model

    model, tok = load_model(model_dir, torch.device("cpu"), dtype="float32", progress=False)
    model.to(torch.bfloat16).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def patched_run(model_dir: Path, data_file: Path,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One fast sande run with --save-patch on the tiny (tied) Llama."""
    d = tmp_path_factory.mktemp("patched")
    out, patch = d / "out", d / "fix.safetensors"
    assert main(sanitize_argv(model_dir, data_file, out, "--save-patch", str(patch))) == 0
    return {"out": out, "patch": patch, "dir": d}


def test_apply_patch_reproduces_the_sanitized_model(model_dir: Path, patched_run: dict[str, Path],
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    applied = tmp_path / "applied"
    assert main(["apply-patch", "--model", str(model_dir), "--patch",
                 str(patched_run["patch"]), "--out", str(applied)]) == 0
    assert "verified" in capsys.readouterr().out
    _same(folder_weights(applied), folder_weights(patched_run["out"]))
    assert json.loads((applied / "config.json").read_text()) == \
        json.loads((patched_run["out"] / "config.json").read_text())
    assert (applied / ".sande-fast").exists() and (applied / "tokenizer.json").exists()
    # The Python API gives the same tensors.
    _same(apply_patch(model_dir, patched_run["patch"]), folder_weights(patched_run["out"]))


def test_patch_holds_only_what_moved_and_says_so(model_dir: Path,
                                                 patched_run: dict[str, Path]) -> None:
    before, after = folder_weights(model_dir), folder_weights(patched_run["out"])
    patch = load_patch(patched_run["patch"])
    moved = {k for k in after if not torch.equal(before[k], after[k])}
    assert set(patch.tensors) == moved and moved
    assert patch.base_sha256 == make_patch(model_dir, model_dir).base_sha256
    with safe_open(str(patched_run["patch"]), framework="pt") as st:
        meta = st.metadata()
    assert meta["format"] == "sande-fast-patch" and meta["format_version"] == "1"
    assert sorted(json.loads(meta["tensors"])) == sorted(moved)
    report = json.loads((patched_run["out"] / "report.json").read_text())
    block = report["patch"]
    assert block["n_changed"] == len(moved) and block["base_sha256"] == patch.base_sha256
    assert len(block["top"]) == min(10, len(moved))
    assert "## Weight change" in (patched_run["out"] / "report.md").read_text()


def test_bf16_patch_is_exact(model_dir: Path, data_file: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    src = _bf16(model_dir, tmp_path / "bf16")
    out, patch, applied = tmp_path / "out", tmp_path / "p.safetensors", tmp_path / "applied"
    assert main(sanitize_argv(src, data_file, out, "--save-patch", str(patch),
                              method="sft")) == 0
    assert main(["apply-patch", "--model", str(src), "--patch", str(patch),
                 "--out", str(applied)]) == 0
    got = folder_weights(applied)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    _same(got, folder_weights(out))
    capsys.readouterr()


def _exit_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()  # what came before (a progress bar of save_pretrained)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_a_patch_for_another_model_is_refused(patched_run: dict[str, Path], tokenizer: Any,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from tiny_models import tiny_model

    other = tmp_path / "other"
    tiny_model("llama", len(tokenizer), seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    argv = ["apply-patch", "--model", str(other), "--patch", str(patched_run["patch"]),
            "--out", str(tmp_path / "o")]
    assert "base_sha256" in _exit_line(argv, capsys)
    assert not (tmp_path / "o").exists()
    assert main(argv + ["--allow-other-base"]) == 0  # same shapes: applies, unverified
    assert "not verified" in capsys.readouterr().out
    assert "not empty" in _exit_line(argv + ["--allow-other-base"], capsys)
    assert main(argv + ["--allow-other-base", "--force"]) == 0
    capsys.readouterr()

    wide = tmp_path / "wide"
    tiny_model("llama", len(tokenizer), seed=0, hidden=48).save_pretrained(wide)
    line = _exit_line(["apply-patch", "--model", str(wide), "--patch", str(patched_run["patch"]),
                       "--out", str(tmp_path / "w")], capsys)
    assert "does not fit" in line and "made for" in line

    short = tmp_path / "short"
    shutil.copytree(other, short)
    w = folder_weights(short)
    name = sorted(load_patch(patched_run["patch"]).tensors)[0]
    del w[name]
    for f in short.glob("*.safetensors"):
        f.unlink()
    save_file(w, str(short / "model.safetensors"), metadata={"format": "pt"})
    line = _exit_line(["apply-patch", "--model", str(short), "--patch",
                       str(patched_run["patch"]), "--out", str(tmp_path / "s")], capsys)
    assert f"no tensor {name}" in line


def test_not_a_patch_and_no_safetensors(model_dir: Path, data_file: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bogus = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(bogus))
    line = _exit_line(["apply-patch", "--model", str(model_dir), "--patch", str(bogus),
                       "--out", str(tmp_path / "o")], capsys)
    assert "not a sande-fast patch" in line
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((model_dir / "config.json").read_text())
    (legacy / "pytorch_model.bin").write_bytes(b"not read")
    line = _exit_line(sanitize_argv(legacy, data_file, tmp_path / "out", "--save-patch",
                                    str(tmp_path / "p.safetensors")), capsys)
    assert "safetensors" in line


def _brute(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, Any]:
    per = {}
    for k in b:
        if torch.equal(a[k], b[k]):
            continue
        d = b[k].double() - a[k].double()
        per[k] = {"norm_delta": math.sqrt(float((d ** 2).sum())),
                  "relative": math.sqrt(float((d ** 2).sum()))
                  / math.sqrt(float((a[k].double() ** 2).sum())),
                  "max_abs": float(d.abs().max()),
                  "changed_elements": int((a[k] != b[k]).sum())}
    return per


def test_stats_match_a_brute_force_computation() -> None:
    g = torch.Generator().manual_seed(0)
    a = {f"w{i}": torch.randn(16, 8, generator=g) for i in range(6)}
    b = {k: v.clone() for k, v in a.items()}
    for i, k in enumerate(["w1", "w3", "w4"]):
        b[k][: i + 2] += (i + 1) * 0.01 * torch.randn(i + 2, 8, generator=g)
    stats = patch_stats(a, b, top=2)
    brute = _brute(a, b)
    assert stats["n_changed"] == 3 and stats["n_tensors"] == 6
    got = {s["name"]: s for s in stats["tensors"]}
    assert got.keys() == brute.keys()
    for k, want in brute.items():
        for key, v in want.items():
            assert got[k][key] == pytest.approx(v, rel=1e-12), (k, key)
    ranked = sorted(brute, key=lambda k: -brute[k]["relative"])
    assert [t["name"] for t in stats["top"]] == ranked[:2]
    total = math.sqrt(sum(v["norm_delta"] ** 2 for v in brute.values()))
    norm_w = math.sqrt(sum(float((t.double() ** 2).sum()) for t in a.values()))
    assert stats["norm_delta"] == pytest.approx(total, rel=1e-12)
    assert stats["relative"] == pytest.approx(total / norm_w, rel=1e-12)
    assert stats["max_abs"] == pytest.approx(max(v["max_abs"] for v in brute.values()))


def test_tied_weights_are_stored_once_and_come_back_tied() -> None:
    emb = torch.randn(10, 4)
    before = {"embed.weight": emb, "head.weight": emb, "norm.weight": torch.ones(4)}
    new = emb + 0.5
    after = {"embed.weight": new, "head.weight": new, "norm.weight": torch.ones(4)}
    patch = make_patch(before, after)
    assert set(patch.tensors) == {"embed.weight"}
    assert patch.aliases == {"head.weight": "embed.weight"}
    got = apply_patch(before, patch)
    assert torch.equal(got["embed.weight"], new)
    assert got["head.weight"] is got["embed.weight"]


def test_signed_zero_counts_as_a_change() -> None:
    a, b = {"z": torch.zeros(3)}, {"z": torch.tensor([0.0, -0.0, 0.0])}
    assert set(make_patch(a, b).tensors) == {"z"}
    assert tensors_digest({"x": "1"}) != tensors_digest({"x": "2"})


def test_state_dict_patch_checks_shape_and_base(tmp_path: Path) -> None:
    a = {"w": torch.zeros(2, 2)}
    patch = make_patch(a, {"w": torch.ones(2, 2)})
    path = tmp_path / "p.safetensors"
    patch.save(path)
    assert isinstance(load_patch(path), Patch)
    with pytest.raises(BadInputError, match="made for"):
        apply_patch({"w": torch.zeros(3, 2)}, path)
    with pytest.raises(BadInputError, match="base_sha256"):
        apply_patch({"w": torch.full((2, 2), 2.0)}, path)
    assert torch.equal(apply_patch({"w": torch.full((2, 2), 2.0)}, path,
                                   allow_other_base=True)["w"], torch.ones(2, 2))
