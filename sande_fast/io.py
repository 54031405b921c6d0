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
import pickle
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .data import BadInputError

__all__ = ["check_out_dir", "check_not_inside", "atomic_dir", "load_model", "save_model",
           "save_parrot", "check_parrot_file", "load_parrot", "write_json", "resolve_device",
           "model_hidden_size", "hf_quiet"]

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


def _abs(p: str | os.PathLike) -> Path:
    """Absolute path with ``..`` and ``.`` folded (symlinks kept, unlike ``resolve``)."""
    return Path(os.path.abspath(os.fspath(p)))


def check_out_dir(out: str | os.PathLike, force: bool) -> Path:
    """Refuses an existing non-empty output folder unless ``force``; nothing is created here."""
    p = Path(out)
    if not os.fspath(out) or _abs(p) == _abs(p).parent:
        raise BadInputError(f"--out {os.fspath(out)!r} cannot be replaced; name a new folder")
    if p.exists() and not p.is_dir():
        raise BadInputError(f"--out {p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()) and not force:
        raise BadInputError(f"--out {p} exists and is not empty; pass --force to replace it")
    parent = _abs(p).parent
    if not parent.is_dir():
        raise BadInputError(f"the parent folder of --out does not exist: {parent}")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write into {parent}")
    return p


def check_not_inside(out: str | os.PathLike, inputs: Iterable[tuple[str, Any]]) -> None:
    """Refuses an ``--out`` that is, or contains, one of the inputs (``--force`` would delete it).

    Args:
        out: the output folder.
        inputs: ``(option name, path or None)`` pairs, e.g. ``("--model", "llama/")``.
    """
    o = _abs(out)
    for name, path in inputs:
        if path is None:
            continue
        i = _abs(path)
        if i == o or o in i.parents:
            raise BadInputError(f"--out {out} holds the {name} input {path}; "
                                "write the result to another folder")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Holds back SIGINT / SIGTERM for the duration (a few renames or a clean-up), then delivers
    them, so an interrupt cannot split the commit or clean-up of :func:`atomic_dir`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        caught.append(signum)

    previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling folder that replaces ``out`` only if the block succeeds.

    On any exception (Ctrl-C and SIGTERM included) the temporary folder is removed and ``out`` is
    left as it was. With ``force`` an existing ``out`` is replaced by rename, never edited in
    place. Interrupts arriving during the final renames or the clean-up are delivered after them.
    """
    target = _abs(check_out_dir(out, force))
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        with _signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    with _signals_deferred():
        try:
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, old / "x")
            try:
                os.rename(tmp, target)
            except BaseException:
                if old is not None:  # put the previous output back
                    os.rename(old / "x", target)
                raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def hf_quiet(progress: bool = True) -> Iterator[None]:
    """Silences transformers' warnings (the caller checks what they would say) and, unless
    ``progress``, its progress bars; the previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _model_folder(p: Path) -> list[str]:
    """Checks that ``p`` looks like a Hugging Face model folder; returns its file names."""
    if not p.exists():
        raise BadInputError(f"model folder not found: {p}")
    if not p.is_dir():
        raise BadInputError(f"--model {p} is not a folder (give the folder save_pretrained wrote)")
    try:
        files = [f.name for f in p.iterdir()]
    except OSError as e:
        raise BadInputError(f"cannot read the model folder {p}: {e.strerror or e}") from None
    if "config.json" not in files:
        raise BadInputError(f"{p} has no config.json: not a Hugging Face model folder")
    if not os.access(p / "config.json", os.R_OK):
        raise BadInputError(f"cannot read {p / 'config.json'}: permission denied")
    if not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
        raise BadInputError(f"{p} has no weights (expected *.safetensors, or a legacy "
                            "pytorch_model.bin)")
    return files


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _remote_code_error(p: Path, e: BaseException) -> BadInputError | None:
    text = str(e)
    if "trust_remote_code" in text or "custom code" in text:
        return BadInputError(f"the model in {p} needs its own Python code to load; pass "
                             "--trust-remote-code only if you trust that folder")
    return None


def model_hidden_size(path: str | os.PathLike, trust_remote_code: bool = False) -> int:
    """The embedding width of the model in ``path``, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    p = Path(path)
    _model_folder(p)
    try:
        with hf_quiet():
            cfg = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise (_remote_code_error(p, e)
               or BadInputError(f"cannot read the config in {p}: {_first_line(e)}")) from None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    if not isinstance(hidden, int):
        raise BadInputError(f"the config in {p} states no hidden size")
    return hidden


def load_model(path: str | os.PathLike, device: torch.device, *, dtype: str | None = None,
               trust_remote_code: bool = False, progress: bool = True) -> tuple[Any, Any]:
    """Loads a Hugging Face causal LM and its tokenizer from a local folder.

    Weights come from safetensors, or from a legacy ``.bin`` through PyTorch's weights-only
    unpickler (a pickle holding anything but tensors is refused, never executed). The folder's
    own Python code runs only with ``trust_remote_code``.

    Raises:
        BadInputError: the folder is missing, has no ``config.json`` or no weights, the weights do
            not cover the model, or loading fails (the message says why).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    files = _model_folder(p)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    torch_dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                   "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                   None: None, "auto": "auto"}
    if dtype not in torch_dtype:
        raise BadInputError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    try:
        with hf_quiet(progress):
            tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
            model, info = AutoModelForCausalLM.from_pretrained(
                p, trust_remote_code=trust_remote_code, use_safetensors=has_safetensors or None,
                weights_only=True, output_loading_info=True,
                dtype=torch_dtype[dtype] or torch.float32)
    except pickle.UnpicklingError:
        raise BadInputError(f"refused to load the weights in {p}: the pickle file holds objects "
                            "other than tensors (convert it to safetensors)") from None
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise (_remote_code_error(p, e)
               or BadInputError(f"cannot load the model in {p}: {_first_line(e)}")) from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInputError(f"the weights in {p} do not match its config: missing "
                            f"{', '.join(missing[:3])}{more}")
    return model.to(device), tok


def save_model(model: Any, tokenizer: Any, out: str | os.PathLike, progress: bool = True) -> None:
    """Saves model (safetensors only) and tokenizer in the Hugging Face layout."""
    with hf_quiet(progress):
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    stray = [f for f in os.listdir(out) if f.endswith((".bin", ".pt", ".pth"))]
    if stray:
        raise RuntimeError(f"unexpected non-safetensors weight files written: {stray}")


def save_parrot(parrot: torch.Tensor, path: str | os.PathLike, **meta: Any) -> None:
    """Writes a parrot ``[n_tokens, hidden]`` to a safetensors file with string metadata.

    The file is written next to ``path`` and renamed over it, so it is never seen half-written.
    """
    with _atomic_file(path) as tmp:
        save_file({"parrot": parrot.detach().float().cpu().contiguous()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in meta.items()})


def check_parrot_file(path: str | os.PathLike, hidden_size: int | None = None) -> tuple[int, int]:
    """Checks a parrot file from its header alone (nothing is loaded); returns its shape.

    Raises:
        BadInputError: missing file, not safetensors, no ``parrot`` tensor, wrong rank, dtype or
            hidden size.
    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"parrot file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            if "parrot" not in f.keys():
                raise BadInputError(f"{p} has no tensor named 'parrot' (was it written by "
                                    "sande-fast?)")
            sl = f.get_slice("parrot")
            shape, dtype = tuple(sl.get_shape()), str(sl.get_dtype())
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(f"{p} is not a readable safetensors file ({_first_line(e)})") from None
    if dtype not in ("F64", "F32", "F16", "BF16"):
        raise BadInputError(f"parrot in {p} has dtype {dtype}; expected a floating point tensor")
    if len(shape) != 2 or shape[0] < 1:
        raise BadInputError(f"parrot in {p} has shape {shape}; expected [n_tokens, hidden]")
    if hidden_size is not None and shape[1] != hidden_size:
        raise BadInputError(f"parrot in {p} has hidden size {shape[1]}, the model has "
                            f"{hidden_size}")
    return shape[0], shape[1]


def load_parrot(path: str | os.PathLike, hidden_size: int) -> torch.Tensor:
    """Reads a parrot saved by :func:`save_parrot` and checks it fits the model.

    Raises:
        BadInputError: missing or unreadable file, no ``parrot`` tensor, wrong rank, hidden size
            or dtype, or NaN / inf values.
    """
    p = Path(path)
    check_parrot_file(p, hidden_size)
    try:
        t = load_file(str(p))["parrot"]
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInputError(f"{p} is not a readable safetensors file ({_first_line(e)})") from None
    if not bool(torch.isfinite(t).all()):
        raise BadInputError(f"parrot in {p} holds NaN or inf values")
    return t.float()


def _file_mode() -> int:
    """The mode a plain ``open(..., "w")`` would give a new file (0o666 less the umask);
    ``mkstemp`` files start as 0o600."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of ``path`` that replaces it whole when the block succeeds."""
    dst = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.absolute().parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Writes ``obj`` as indented JSON; the file is replaced whole (temp file, then rename)."""
    with _atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
