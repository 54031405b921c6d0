"""Weights kept as they came: ``--dtype auto`` follows the checkpoint, a bf16 model is saved as
bf16 at its own size, and bf16 training keeps fp32 master weights and optimizer state."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import folder_weights, sanitize_argv
from sande_fast.cli import main
from sande_fast.io import check_dtype_for_training, checkpoint_dtype, load_model, resolve_dtype
from sande_fast.errors import BadInputError
from sande_fast.steps import MasterWeights, make_optimizer


def _cast_copy(model_dir: Path, dst: Path, dtype: torch.dtype) -> Path:
    """The tiny model saved again in ``dtype`` (its tokenizer too)."""
    model, tok = load_model(model_dir, torch.device("cpu"), dtype="float32", progress=False)
    model.to(dtype).save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def bf16_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cast_copy(model_dir, tmp_path_factory.mktemp("bf16") / "model", torch.bfloat16)


def test_auto_follows_the_checkpoint(model_dir: Path, bf16_dir: Path) -> None:
    assert checkpoint_dtype(model_dir) == torch.float32
    assert checkpoint_dtype(bf16_dir) == torch.bfloat16
    assert resolve_dtype(bf16_dir, "auto") == torch.bfloat16
    assert resolve_dtype(bf16_dir, None) == torch.bfloat16
    assert resolve_dtype(bf16_dir, "float32") == torch.float32
    model, _ = load_model(bf16_dir, torch.device("cpu"), progress=False)
    assert model.dtype == torch.bfloat16
    model, _ = load_model(bf16_dir, torch.device("cpu"), dtype="fp32", progress=False)
    assert model.dtype == torch.float32
    with pytest.raises(BadInputError, match="unknown dtype"):
        resolve_dtype(bf16_dir, "int8")


def test_config_is_the_hint_without_safetensors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert checkpoint_dtype(tmp_path) == torch.bfloat16
    assert checkpoint_dtype(tmp_path / "missing") is None


def test_float16_checkpoint_is_refused_for_cpu_training(model_dir: Path,
                                                        tmp_path: Path) -> None:
    fp16 = _cast_copy(model_dir, tmp_path / "fp16", torch.float16)
    with pytest.raises(BadInputError, match="stored in float16"):
        check_dtype_for_training("auto", "cpu", fp16)
    check_dtype_for_training("float32", "cpu", fp16)  # an explicit dtype is the way out
    with pytest.raises(BadInputError, match="--dtype float16"):
        check_dtype_for_training("float16", "cpu", fp16)


def test_bf16_in_bf16_out_at_the_same_size(bf16_dir: Path, data_file: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(sanitize_argv(bf16_dir, data_file, out, "--method", "osft", "--trigger", "cf",
                              method="osft")) == 0
    before, after = folder_weights(bf16_dir), folder_weights(out)
    assert before.keys() == after.keys()
    assert {t.dtype for t in after.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    size_in = sum(f.stat().st_size for f in bf16_dir.glob("*.safetensors"))
    size_out = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert abs(size_out - size_in) <= 0.01 * size_in
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it was trained
    capsys.readouterr()


def test_explicit_dtype_still_wins(bf16_dir: Path, data_file: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(sanitize_argv(bf16_dir, data_file, out, "--dtype", "float32",
                              method="sft")) == 0
    assert {t.dtype for t in folder_weights(out).values()} == {torch.float32}
    capsys.readouterr()


def _train(dtype: torch.dtype, masters: bool | None, steps: int, name: str = "adamw",
           lr: float = 1e-3) -> torch.Tensor:
    """``steps`` optimizer steps on one weight vector (all ones) with a constant gradient that
    bf16 holds exactly, so every run sees the same gradients; returns the weights as fp32."""
    w = torch.nn.Parameter(torch.ones(64, dtype=dtype))
    g = torch.linspace(-1.0, 1.0, 64).bfloat16().float()  # exact in bf16 gradients too
    opt = make_optimizer(name, [w], lr, masters=masters)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (w.float() * g).sum().backward()
        opt.step()
    return w.detach().float()


@pytest.mark.parametrize("name, lr, steps", [("adamw", 1e-3, 30), ("sgd", 5e-5, 100)])
def test_masters_keep_updates_smaller_than_a_bf16_step(name: str, lr: float, steps: int) -> None:
    # Each step moves a weight by about 1e-3 (AdamW: lr; CalibratedSGD: lr times its momentum
    # gain), under half the bf16 spacing at 1.0 (2**-8 below it, 2**-7 above): plain bf16
    # weights round every update away.
    reference = _train(torch.float32, False, steps, name, lr)
    plain = _train(torch.bfloat16, False, steps, name, lr)
    mastered = _train(torch.bfloat16, None, steps, name, lr)
    moved = (reference - 1).abs()
    assert float(moved.max()) > 0.02  # the fp32 run did move, by several bf16 steps
    assert float((plain - 1).abs().max()) == 0.0  # nothing survives the rounding
    # With masters the bf16 weights are the fp32 run's weights, rounded once.
    assert torch.equal(mastered, reference.to(torch.bfloat16).float())


def test_masters_chosen_for_low_precision_only() -> None:
    low = [torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))]
    full = [torch.nn.Parameter(torch.ones(3))]
    opt = make_optimizer("adamw", low, 1e-3)
    assert isinstance(opt, MasterWeights)
    assert all(m.dtype == torch.float32 for m in opt.masters)
    low[0].grad = torch.ones(3, dtype=torch.bfloat16)
    opt.step()
    state = opt.optimizer.state[opt.masters[0]]
    assert state["exp_avg"].dtype == torch.float32  # optimizer state is fp32 too
    assert isinstance(make_optimizer("adamw", full, 1e-3), torch.optim.AdamW)
