"""Files: loading models safely, saving them atomically, parrots as safetensors.

A sanitize run rewrites somebody's model, so nothing is written to ``--out`` until everything is
ready: the output is built in a hidden sibling folder and renamed into place at the end. Weights are
read only from safetensors (or through PyTorch's weights-only loader for legacy ``.bin`` files,
which transformers uses); remote code runs only when the caller asks for it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .data import BadInputError

__all__ = ["check_out_dir", "atomic_dir", "load_model", "save_model", "save_parrot",
           "load_parrot", "write_json", "resolve_device"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an unavailable CUDA is a clear error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadInputError(f"unknown device {device!r}; use cpu, cuda or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda asked for, but no CUDA GPU is available")
    return dev


def check_out_dir(out: str | os.PathLike, force: bool) -> Path:
    """Refuses an existing non-empty output folder unless ``force``; nothing is created here."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise BadInputError(f"--out {p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise BadInputError(f"--out {p} exists and is not empty; pass --force to replace it")
    parent = p.absolute().parent
    if not parent.is_dir():
        raise BadInputError(f"the parent folder of --out does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write into {parent}")
    return p


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder that replaces ``out`` only if the block succeeds.

    On any exception (Ctrl-C included) the temporary folder is removed and ``out`` is left as it
    was. With ``force`` an existing ``out`` is replaced by rename, never edited in place.
    """
    target = check_out_dir(out, force).absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, old / "x")
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_model(path: str | os.PathLike, device: torch.device, *, dtype: str | None = None,
               trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Loads a Hugging Face causal LM and its tokenizer from a local folder.

    Raises:
        BadInputError: the folder is missing, has no ``config.json`` or no weights, or loading
            fails (the message says why).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise BadInputError(f"model folder not found: {p}")
    if not (p / "config.json").is_file():
        raise BadInputError(f"{p} has no config.json: not a Hugging Face model folder")
    files = [f.name for f in p.iterdir()]
    if not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
        raise BadInputError(f"{p} has no weights (*.safetensors)")
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                   "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                   None: None, "auto": "auto"}
    if dtype not in torch_dtype:
        raise BadInputError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    try:
        tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            p, trust_remote_code=trust_remote_code, use_safetensors=has_safetensors or None,
            dtype=torch_dtype[dtype] or torch.float32)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInputError(f"cannot load the model in {p}: {first}") from None
    return model.to(device), tok


def save_model(model: Any, tokenizer: Any, out: str | os.PathLike) -> None:
    """Saves model (safetensors only) and tokenizer in the Hugging Face layout."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stray = [f for f in os.listdir(out) if f.endswith((".bin", ".pt", ".pth"))]
    if stray:
        raise RuntimeError(f"unexpected non-safetensors weight files written: {stray}")


def save_parrot(parrot: torch.Tensor, path: str | os.PathLike, **meta: Any) -> None:
    """Writes a parrot ``[n_tokens, hidden]`` to a safetensors file with string metadata."""
    save_file({"parrot": parrot.detach().float().cpu().contiguous()}, str(path),
              metadata={k: json.dumps(v) for k, v in meta.items()})


def load_parrot(path: str | os.PathLike, hidden_size: int) -> torch.Tensor:
    """Reads a parrot saved by :func:`save_parrot` and checks it fits the model.

    Raises:
        BadInputError: missing or unreadable file, no ``parrot`` tensor, wrong rank, hidden size
            or dtype.
    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"parrot file not found: {p}")
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInputError(f"{p} is not a readable safetensors file ({e})") from None
    t = tensors.get("parrot")
    if t is None:
        raise BadInputError(f"{p} has no tensor named 'parrot'")
    if t.dim() != 2 or t.shape[0] < 1:
        raise BadInputError(f"parrot in {p} has shape {tuple(t.shape)}; expected [n_tokens, hidden]")
    if t.shape[1] != hidden_size:
        raise BadInputError(f"parrot in {p} has hidden size {t.shape[1]}, the model has {hidden_size}")
    if not t.is_floating_point():
        raise BadInputError(f"parrot in {p} has dtype {t.dtype}; expected a floating point tensor")
    if not bool(torch.isfinite(t).all()):
        raise BadInputError(f"parrot in {p} holds NaN or inf values")
    return t.float()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
