"""Files: loading models safely, saving them atomically, parrots as safetensors.

A sanitize run rewrites somebody's model, so nothing is written to ``--out`` until everything is
ready: the output is built in a hidden sibling folder and renamed into place at the end. Weights are
read only from safetensors (or through PyTorch's weights-only loader for legacy ``.bin`` files,
which transformers uses); remote code runs only when the caller asks for it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import pickle
import shutil
import signal
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import BadInputError, Terminated
# Moved to .logs; still importable from here.
from .logs import fold_lines, hf_quiet, route_warnings  # noqa: F401

__all__ = ["check_out_dir", "claim_out_dir", "release_claims", "atomic_dir", "atomic_file",
           "claim_out_file", "write_output_json", "is_tool_json", "interrupt_handlers",
           "Terminated", "resume_dir", "resume_parrot_path", "discard_resume", "disk_error_line",
           "route_warnings", "check_shard_index", "check_weights_finite",
           "check_dtype_for_training", "checkpoint_dtype", "resolve_dtype", "load_model", "save_model", "save_parrot",
           "check_parrot_file", "load_parrot", "write_json", "resolve_device",
           "model_hidden_size", "hf_quiet", "OUTPUT_MARKER"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

_LOG = logging.getLogger(__name__)

# transformers' report of missing and unexpected weights (a multi-line table since 5.0, "Some
# weights of ..." before): load_model reads the same lists from output_loading_info, refuses
# missing weights and names unused ones in one line of its own.
_LOADING_INFO = (r"LOAD REPORT", r"^Some weights of ")


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


# ------------------------------------------------------------------------------ output claims
#
# Every path the tool writes is claimed before any work starts and checked again just before it
# is replaced, so a run can never overwrite an input, somebody else's folder, or another run's
# output. A folder ``--out`` is claimed by creating it (``mkdir`` is atomic) or, when it exists
# (empty, or an earlier output of this tool under ``--force``), by creating a claim file inside
# it with ``O_EXCL``; a second run to the same ``--out`` finds the claim and is refused at once.

OUTPUT_MARKER = ".sande-fast"
"""The file every output folder of this tool holds; ``--force`` replaces only such folders."""
CLAIM_FILE = ".sande-fast.claim"
"""Present in ``--out`` while a run is writing it (its pid and a token)."""
JSON_MARKER_KEY = "written_by"
JSON_MARKER = "sande-fast"


def _real(p: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(p)))


def _is_within(inner: Path, outer: Path) -> bool:
    """True when ``inner`` is ``outer`` or lies below it (both already resolved)."""
    return inner == outer or outer in inner.parents


def _same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inputs(inputs: Iterable[tuple[str, Any]]) -> list[tuple[str, str, Path]]:
    """``(option, as given, real path)`` for each input that was given."""
    return [(name, os.fspath(p), _real(p)) for name, p in inputs
            if p is not None and os.fspath(p) != ""]


def _protected_folders() -> list[Path]:
    """Folders no output may ever be, whatever ``--force`` says: ``/``, the home folder and the
    current folder with all its parents."""
    out = [Path("/")]
    with contextlib.suppress(Exception):
        out.append(_real(Path.home()))
    with contextlib.suppress(OSError):
        cwd = _real(os.getcwd())
        out += [cwd, *cwd.parents]
    return out


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_claim(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _claim_is_live(path: Path) -> bool:
    """A claim file held by a process that still runs (an unreadable one counts as live)."""
    obj = _read_claim(path)
    if obj is None:
        return path.exists()
    pid = obj.get("pid")
    return not isinstance(pid, int) or _pid_alive(pid)


def _folder_state(p: Path) -> tuple[set[str], bool]:
    """(names in ``p``, whether it is an earlier output of this tool)."""
    try:
        names = set(os.listdir(p))
    except OSError as e:
        raise BadInputError(f"cannot read --out {p}: {e.strerror or e}") from None
    return names, OUTPUT_MARKER in names or _legacy_output(p, names)


def _legacy_output(p: Path, names: set[str]) -> bool:
    """An output written before :data:`OUTPUT_MARKER` existed: its ``report.json`` (sanitize,
    demo) or ``toy.json`` (make-toy) has the keys only this tool writes."""
    for name, keys in (("report.json", {"method", "before", "after", "timing", "environment"}),
                       ("toy.json", {"trigger", "target", "recipe_version", "key"})):
        if name in names:
            try:
                if (p / name).stat().st_size > 64 * 2**20:
                    continue
                obj = json.loads((p / name).read_text(encoding="utf-8"))
            except (OSError, ValueError, UnicodeDecodeError, RecursionError):
                continue
            if isinstance(obj, dict) and keys <= set(obj):
                return True
    return False


def _mode_dir() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o777 & ~mask


class OutputClaim:
    """A claimed output folder (see :func:`claim_out_dir`). Release it with :meth:`release`."""

    def __init__(self, path: Path, created: bool, replaces: bool, ident: tuple[int, int],
                 token: str, option: str) -> None:
        self.path = path
        self.created = created
        self.replaces = replaces
        self.ident = ident
        self.token = token
        self.option = option
        self.done = False

    @property
    def claim_file(self) -> Path:
        return self.path / CLAIM_FILE

    def holds(self) -> bool:
        """True while ``path`` is still the folder claimed, with this claim's file in it."""
        try:
            st = os.lstat(self.path)
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != self.ident or not os.path.isdir(self.path) \
                or os.path.islink(self.path):
            return False
        obj = _read_claim(self.claim_file)
        return obj is not None and obj.get("token") == self.token

    def check_unchanged(self) -> None:
        """Raises :class:`BadInputError` when ``--out`` changed since it was claimed."""
        changed = BadInputError(
            f"{self.option} {self.path} was changed by someone else during the run; it was left "
            "as it is and the result was discarded (choose a folder nobody else writes to)")
        if not self.holds():
            raise changed
        names, ours = _folder_state(self.path)
        extra = names - {CLAIM_FILE, OUTPUT_MARKER}
        if self.replaces:
            if not ours:
                raise changed
        elif extra or OUTPUT_MARKER in names:
            raise changed

    def release(self) -> None:
        """Gives the folder back as it was: removes the claim file and, when the claim created the
        folder, the folder if it is still empty (nothing someone else put there is touched)."""
        if self.done:
            return
        self.done = True
        if self.holds():
            with contextlib.suppress(OSError):
                os.unlink(self.claim_file)
            if self.created:
                with contextlib.suppress(OSError):
                    os.rmdir(self.path)  # fails, harmlessly, unless it is empty
        _CLAIMS.pop(str(self.path), None)


_CLAIMS: dict[str, OutputClaim] = {}


def _refuse_protected(p: Path, option: str, shown: str) -> None:
    for f in _protected_folders():
        if p == f:
            what = {Path("/"): "the root folder"}.get(f, "the current folder or one of its "
                                                        "parents" if f != _real(Path.home())
                                                        else "your home folder")
            raise BadInputError(f"{option} {shown} is {what}; name a new folder for the result")


def check_out_dir(out: str | os.PathLike, force: bool,
                  inputs: Iterable[tuple[str, Any]] = (), option: str = "--out") -> Path:
    """Checks that ``out`` may be written (nothing is created); returns its resolved path.

    Refused, whatever ``force`` says: an empty name, a symbolic link (a dangling one too), a file,
    ``/``, the home folder, the current folder or a parent of it, a folder that holds one of
    ``inputs`` or lies inside an input folder, and a folder another run is writing. An existing
    non-empty folder needs ``force``, and even then only an earlier output of this tool (it holds
    :data:`OUTPUT_MARKER`) is replaced.

    Args:
        out: the output folder.
        force: allow replacing an earlier output of this tool.
        inputs: ``(option name, path or None)`` pairs, e.g. ``("--model", "llama/")``; compared
            by real path, so symlinks and ``..`` are seen through.
        option: the option name used in messages.

    Raises:
        BadInputError: the message says why and what to do.
    """
    shown = os.fspath(out)
    if not shown or not shown.strip():
        raise BadInputError(f"{option} must name a folder")
    raw = Path(os.path.abspath(shown))
    if os.path.islink(raw):
        where = "" if os.path.exists(raw) else " that points nowhere"
        raise BadInputError(f"{option} {shown} is a symbolic link{where}; give the real folder "
                            "path (the link would be replaced, not what it points to)")
    parent = _real(raw.parent)
    if not parent.is_dir():
        raise BadInputError(f"the parent folder of {option} does not exist: {raw.parent}")
    p = parent / raw.name if raw.name not in ("", ".", "..") else _real(raw)
    _refuse_protected(p, option, shown)
    if os.path.lexists(p) and not p.is_dir():
        raise BadInputError(f"{option} {shown} exists and is not a folder")
    for name, given, real in _inputs(inputs):
        if _is_within(real, p) or (p.exists() and _same_file(real, p)):
            raise BadInputError(f"{option} {shown} holds the {name} input {given}; write the "
                                "result to another folder")
        if real.is_dir() and _is_within(p, real):
            raise BadInputError(f"{option} {shown} lies inside the {name} input {given}; write "
                                "the result to another folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write into {parent}")
    if p.is_dir():
        names, ours = _folder_state(p)
        if CLAIM_FILE in names and _claim_is_live(p / CLAIM_FILE):
            obj = _read_claim(p / CLAIM_FILE) or {}
            raise BadInputError(f"{option} {shown} is being written by another sande-fast run "
                                f"(pid {obj.get('pid', '?')}); wait for it or choose another "
                                "folder")
        content = names - {CLAIM_FILE}
        if content and not force:
            raise BadInputError(f"{option} {shown} exists and is not empty; pass --force to "
                                "replace it")
        if content and not ours:
            raise BadInputError(f"{option} {shown} was not written by sande-fast (it has no "
                                f"{OUTPUT_MARKER} file); --force only replaces an earlier output "
                                "of this tool: choose another folder or empty it yourself")
    return p


def claim_out_dir(out: str | os.PathLike, force: bool,
                  inputs: Iterable[tuple[str, Any]] = (), option: str = "--out") -> OutputClaim:
    """Claims ``out`` for this process before any work starts (see :func:`check_out_dir`).

    The folder is created (atomically) when it does not exist; otherwise a claim file is created
    in it with ``O_EXCL``. Either way a second run to the same folder is refused at once. The
    claim is re-checked by :func:`atomic_dir` just before the result is moved into place.

    Raises:
        BadInputError: ``out`` may not be written, or another run holds it.
    """
    inputs = list(inputs)
    key = None
    with contextlib.suppress(Exception):
        key = str(_real(Path(os.path.abspath(os.fspath(out))).parent) / Path(os.fspath(out)).name)
    if key in _CLAIMS and not _CLAIMS[key].done:
        return _CLAIMS[key]
    p = check_out_dir(out, force, inputs, option)
    created = False
    for _ in range(3):
        try:
            os.mkdir(p, _mode_dir())
            created = True
            break
        except FileExistsError:
            p = check_out_dir(out, force, inputs, option)  # someone was quicker: look again
            if p.is_dir():
                break
        except OSError as e:
            raise BadInputError(f"cannot create {option} {p}: {e.strerror or e}") from None
    token = f"{os.getpid()}-{os.urandom(8).hex()}"
    claim_path = p / CLAIM_FILE
    for _ in range(2):
        try:
            fd = os.open(claim_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            if _claim_is_live(claim_path):
                if created:
                    with contextlib.suppress(OSError):
                        os.rmdir(p)
                obj = _read_claim(claim_path) or {}
                raise BadInputError(f"{option} {os.fspath(out)} is being written by another "
                                    f"sande-fast run (pid {obj.get('pid', '?')}); wait for it or "
                                    "choose another folder") from None
            # a stale claim of a run that was killed: take it over
            stale = p / f"{CLAIM_FILE}.{token}"
            try:
                os.rename(claim_path, stale)
                os.unlink(stale)
            except OSError:
                pass
        except OSError as e:
            raise BadInputError(f"cannot write into {option} {p}: {e.strerror or e}") from None
    else:
        raise BadInputError(f"{option} {os.fspath(out)} is being written by another run")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "token": token}, f)
    st = os.lstat(p)
    names, ours = _folder_state(p)
    claim = OutputClaim(p, created, bool(names - {CLAIM_FILE}), (st.st_dev, st.st_ino), token,
                        option)
    _CLAIMS[str(p)] = claim
    return claim


def release_claims() -> None:
    """Releases every claim of this process that was not completed (called on the way out)."""
    for claim in list(_CLAIMS.values()):
        claim.release()



@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Holds back SIGINT / SIGTERM / SIGHUP for the duration (a few renames or a clean-up), then
    delivers them, so an interrupt cannot split the commit or clean-up of :func:`atomic_dir`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    try:
        with _stop_signals_to(lambda signum, frame: caught.append(signum)):
            yield
    finally:
        if caught:
            signal.raise_signal(caught[0])


_STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")
                      if hasattr(signal, n))


@contextlib.contextmanager
def interrupt_handlers() -> Iterator[None]:
    """Turns SIGINT into ``KeyboardInterrupt`` and SIGTERM / SIGHUP into :class:`Terminated`,
    once: a second signal while the first is being handled (a second Ctrl-C during the clean-up)
    is ignored, so the clean-up always runs to its end. A signal the caller ignores (``nohup``,
    a background job) stays ignored. Previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hit: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if hit:
            return
        if _in_finalizer(frame):
            # Python prints and drops an exception raised inside __del__ or a weakref callback
            # ("Exception ignored in ..."), so the run would go on; the signal is sent again a
            # moment later, to land outside the finalizer.
            threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
            return
        hit.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    with _stop_signals_to(handler):
        yield


def _in_finalizer(frame: Any) -> bool:
    """Whether ``frame`` runs inside an object's ``__del__`` or a weakref callback, where a
    raised exception is dropped."""
    while frame is not None:
        code = frame.f_code
        if code.co_name == "__del__" or code.co_filename.endswith(("weakref.py", "_weakrefset.py")):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _stop_signals_to(handler: Any) -> Iterator[None]:
    """Routes SIGINT / SIGTERM / SIGHUP to ``handler`` for the duration (main thread only); a
    signal the caller ignores stays ignored, and the previous handlers come back afterwards."""
    previous = {}
    for s in _STOP_SIGNALS:
        h = signal.getsignal(s)
        if h is not signal.SIG_IGN:
            previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def _write_marker(folder: Path) -> None:
    from .version import __version__

    with open(folder / OUTPUT_MARKER, "w", encoding="utf-8") as f:
        json.dump({"written_by": JSON_MARKER, "version": __version__}, f)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False,
               inputs: Iterable[tuple[str, Any]] = ()) -> Iterator[Path]:
    """Yields a temporary sibling folder that replaces ``out`` only if the block succeeds.

    ``out`` is claimed first (:func:`claim_out_dir`; a claim made earlier by this process is
    reused). Just before the result is moved into place the claim is checked again: if the folder
    changed meanwhile (somebody put files in it, replaced or removed it) nothing is replaced and
    :class:`BadInputError` is raised. On any exception (Ctrl-C, SIGTERM and SIGHUP included) the
    temporary folder is removed, the claim released and ``out`` left as it was. With ``force`` an
    earlier output of this tool is replaced by rename, never edited in place. Interrupts arriving
    during the final renames or the clean-up are delivered after them.
    """
    claim = claim_out_dir(out, force, inputs)
    target = claim.path
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        os.chmod(tmp, _mode_dir())  # mkdtemp makes 0700; the user's umask decides
    except BaseException:
        claim.release()
        raise
    try:
        yield tmp
        _write_marker(tmp)
    except BaseException:
        with _signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)
            claim.release()
        raise
    with _signals_deferred():
        old = None
        try:
            claim.check_unchanged()
            if not claim.replaces:
                os.unlink(claim.claim_file)
                try:
                    os.rename(tmp, target)  # replaces the empty folder claimed at the start
                except OSError as e:
                    if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                        raise BadInputError(f"--out {target} was changed by someone else during "
                                            "the run; it was left as it is and the result was "
                                            "discarded") from None
                    raise
            else:
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.rename(target, old / "x")
                try:
                    os.rename(tmp, target)
                except BaseException:
                    os.rename(old / "x", target)  # put the previous output back
                    raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            claim.release()
            if old is not None:
                with contextlib.suppress(OSError):
                    if (old / "x").exists():
                        os.rename(old / "x", target)
                shutil.rmtree(old, ignore_errors=True)
            raise
        claim.done = True
        _CLAIMS.pop(str(claim.path), None)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
    check_shard_index(p)
    if not any(f.endswith(_WEIGHT_SUFFIXES) for f in files):
        raise BadInputError(f"{p} has no weights (expected *.safetensors, or a legacy "
                            "pytorch_model.bin)")
    return files


def _first_line(e: BaseException) -> str:
    """The whole message on one line (a message cut at its first line can end mid-sentence)."""
    return fold_lines(str(e)) or type(e).__name__


def _remote_code_error(p: Path, e: BaseException) -> BadInputError | None:
    text = str(e)
    if "trust_remote_code" in text or "custom code" in text:
        return BadInputError(f"the model in {p} needs its own Python code to load; pass "
                             "--trust-remote-code only if you trust that folder")
    return None


def model_hidden_size(path: str | os.PathLike, trust_remote_code: bool = False) -> int:
    """The embedding width of the model in ``path``, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    from .lora import adapter_base, is_adapter_folder

    p = Path(path)
    if p.is_dir() and is_adapter_folder(p) and not (p / "config.json").is_file():
        p = adapter_base(p)
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


# The names --dtype takes ("auto": the checkpoint's own dtype, see :func:`checkpoint_dtype`).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "F64": torch.float64}


def checkpoint_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The floating-point dtype the weights in a model folder are stored in, or None if unknown.

    The safetensors headers are read first (they say what the files hold; the dtype holding the
    most elements wins, so a bf16 model with a few fp32 norms is bf16), then ``dtype`` /
    ``torch_dtype`` in ``config.json`` (the only hint for a legacy ``.bin``). Nothing is loaded
    and nothing raises: an unreadable folder gives None and the load itself reports why.
    """
    p = Path(path)
    counts: dict[torch.dtype, int] = {}
    with contextlib.suppress(Exception):
        for f in sorted(p.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    sl = st.get_slice(name)
                    dt = _SAFETENSORS_DTYPES.get(str(sl.get_dtype()))
                    if dt is not None:
                        n = 1
                        for d in sl.get_shape():
                            n *= int(d)
                        counts[dt] = counts.get(dt, 0) + n
    if counts:
        best = max(counts, key=lambda d: counts[d])
        return torch.float32 if best == torch.float64 else best
    with contextlib.suppress(Exception):
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
        for key in ("dtype", "torch_dtype"):
            value = str(cfg.get(key) or "").removeprefix("torch.")
            if value in DTYPES:
                return DTYPES[value]
    return None


def resolve_dtype(path: str | os.PathLike, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype a model is loaded in: ``dtype`` when named, else (``auto`` or None) the
    checkpoint's own (:func:`checkpoint_dtype`), float32 when that is unknown.

    Raises:
        BadInputError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or str(dtype).lower() == "auto":
        return checkpoint_dtype(path) or torch.float32
    if str(dtype).lower() not in DTYPES:
        raise BadInputError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
    return DTYPES[str(dtype).lower()]


def load_model(path: str | os.PathLike, device: torch.device, *, dtype: str | None = "auto",
               trust_remote_code: bool = False, progress: bool = True,
               base_model: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """Loads a Hugging Face causal LM and its tokenizer from a local folder.

    A PEFT LoRA adapter folder loads as its base model (``base_model``, else the one its
    config names) with the adapter attached (:func:`sande_fast.lora.load_adapter_model`).

    Weights come from safetensors, or from a legacy ``.bin`` through PyTorch's weights-only
    unpickler (a pickle holding anything but tensors is refused, never executed). The folder's
    own Python code runs only with ``trust_remote_code``.

    Args:
        dtype: ``float32``, ``bfloat16``, ``float16``, or ``auto`` / None (the checkpoint's own
            dtype, so a bf16 model stays bf16 and is saved back at its size; see
            :func:`resolve_dtype`).

    Raises:
        BadInputError: the folder is missing, has no ``config.json`` or no weights, the weights do
            not cover the model, or loading fails (the message says why).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .lora import is_adapter_folder, load_adapter_model

    p = Path(path)
    if p.is_dir() and is_adapter_folder(p) and not (p / "config.json").is_file():
        return load_adapter_model(p, device, base_model=base_model, dtype=dtype,
                                  trust_remote_code=trust_remote_code, progress=progress,
                                  load_base=load_model)
    if base_model is not None:
        raise BadInputError(f"--base-model is for a PEFT adapter folder as --model; {p} holds "
                            "no adapter_config.json")
    files = _model_folder(p)
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    load_dtype = resolve_dtype(p, dtype)
    try:
        # Warnings are held back until the load succeeds: one printed before a refusal (torch's
        # pickle warning before "refused to load") would only mislead.
        with hf_quiet(progress, drop=_LOADING_INFO), \
                warnings.catch_warnings(record=True) as held:
            warnings.simplefilter("default")
            tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
            model, info = AutoModelForCausalLM.from_pretrained(
                p, trust_remote_code=trust_remote_code, use_safetensors=has_safetensors or None,
                weights_only=True, output_loading_info=True,
                dtype=load_dtype)
    except pickle.UnpicklingError:
        raise BadInputError(f"refused to load the weights in {p}: the pickle file holds objects "
                            "other than tensors (convert it to safetensors)") from None
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        if "above report" in str(e) or "size mismatch" in str(e):
            raise BadInputError(f"cannot load the model in {p}: the shapes of its weights do not "
                                "match its config.json") from None
        if isinstance(e, RuntimeError) and "UnpicklingError" in str(e):
            raise BadInputError(f"refused to load the weights in {p}: the pickle file holds "
                                "objects other than tensors (convert it to safetensors)") from None
        raise (_remote_code_error(p, e)
               or BadInputError(f"cannot load the model in {p}: {_first_line(e)}")) from None
    except Exception as e:  # tokenizers' own errors, a template that fails to compile, ...
        if type(e).__module__.split(".")[0] in ("tokenizers", "jinja2", "safetensors",
                                                 "json", "sentencepiece"):
            raise BadInputError(f"cannot load the model in {p}: {_first_line(e)}") from None
        raise
    for w in held:  # --quiet hides them on stderr; a --log-file still gets them
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    check_weights_finite(model, str(p))
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise BadInputError(f"the weights in {p} do not match its config: missing "
                            f"{', '.join(missing[:3])}{more}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        _LOG.warning("%s: %d weight(s) of the checkpoint are not used by the model: %s%s", p,
                     len(unexpected), ", ".join(unexpected[:3]), more)
    _LOG.info("loaded %s: %s, %s parameters, %s", p, type(model).__name__,
              f"{sum(t.numel() for t in model.parameters()):,}", next(model.parameters()).dtype)
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
    A missing resume folder (:func:`resume_dir`) is created.
    """
    parent = Path(os.path.abspath(os.fspath(path))).parent
    if not parent.exists() and _is_within(_real(parent), _real(resume_root())):
        parent.mkdir(parents=True, exist_ok=True)
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
def _atomic_file(path: str | os.PathLike, claim: FileClaim | None = None) -> Iterator[Path]:
    """Yields a temporary sibling of ``path`` that replaces it whole when the block succeeds
    (after ``claim``, when given, confirms nobody else created or replaced ``path`` meanwhile)."""
    dst = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.absolute().parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        with _signals_deferred():
            if claim is not None:
                claim.check_unchanged()
            os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


atomic_file = _atomic_file
"""Public name of :func:`_atomic_file` (the patch writer uses it)."""


def write_json(path: str | os.PathLike, obj: Any, claim: FileClaim | None = None) -> None:
    """Writes ``obj`` as indented JSON; the file is replaced whole (temp file, then rename)."""
    with _atomic_file(path, claim) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# ------------------------------------------------------------------------------ output files

class FileClaim:
    """An output file checked by :func:`claim_out_file`; :meth:`check_unchanged` looks again
    just before the file is replaced."""

    def __init__(self, path: Path, ident: tuple[int, int] | None, option: str) -> None:
        self.path = path
        self.ident = ident
        self.option = option

    def check_unchanged(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        now = None if st is None else (st.st_dev, st.st_ino)
        if now != self.ident or (st is not None and not _stat_is_regular(st)):
            raise BadInputError(f"{self.option} {self.path} was created or replaced by someone "
                                "else during the run; it was left as it is (nothing written)")


def _stat_is_regular(st: os.stat_result) -> bool:
    import stat as _stat

    return _stat.S_ISREG(st.st_mode)


def is_tool_json(path: str | os.PathLike) -> bool:
    """True when ``path`` is a JSON file this tool wrote (it carries ``"written_by"``)."""
    try:
        if os.path.getsize(path) > 64 * 2**20:
            return False
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and obj.get(JSON_MARKER_KEY) == JSON_MARKER


def claim_out_file(path: str | os.PathLike, force: bool = False,
                   inputs: Iterable[tuple[str, Any]] = (), option: str = "--json") -> FileClaim:
    """Checks that the output file ``path`` may be written, before any work is done.

    Refused (exit 2), whatever ``force`` says: an empty name, a folder, a symbolic link, anything
    that is not a regular file (a device, FIFO or socket), one of ``inputs`` (compared by real path
    and ``samefile``, so links are seen through) and any file inside an input folder (a model).
    An existing file that this tool did not write (:func:`is_tool_json`) needs ``force``.

    Args:
        path: the file to be written.
        force: allow replacing an existing regular file that is no input.
        inputs: ``(option name, path or None)`` pairs.
        option: the option name used in messages.

    Raises:
        BadInputError: the message says why.
    """
    shown = os.fspath(path)
    if not shown.strip():
        raise BadInputError(f"{option} must name a file")
    raw = Path(os.path.abspath(shown))
    if os.path.islink(raw):
        raise BadInputError(f"{option} {shown} is a symbolic link; give the real file path")
    parent = _real(raw.parent)
    if not parent.is_dir():
        raise BadInputError(f"the folder of {option} does not exist: {raw.parent}")
    p = parent / raw.name
    ident = None
    if raw.name in ("", ".", "..") or p.is_dir():
        raise BadInputError(f"{option} {shown} is a folder; give a file name")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise BadInputError(f"cannot look at {option} {shown}: {e.strerror or e}") from None
    if st is not None:
        if not _stat_is_regular(st):
            raise BadInputError(f"{option} {shown} is not a regular file (a device, FIFO or "
                                "socket); give a new file name")
        ident = (st.st_dev, st.st_ino)
    for name, given, real in _inputs(inputs):
        if real == p or (st is not None and _same_file(real, p)):
            raise BadInputError(f"{option} {shown} is the {name} input; give a new file name")
        if real.is_dir() and _is_within(p, real):
            raise BadInputError(f"{option} {shown} lies inside the {name} folder {given}; "
                                "write it elsewhere")
    if (parent / "config.json").exists() and any(
            n.endswith((".safetensors", ".safetensors.index.json")) for n in os.listdir(parent)):
        raise BadInputError(f"{option} {shown} lies inside a model folder; write it elsewhere")
    if st is not None and not force and not is_tool_json(p):
        raise BadInputError(f"{option} {shown} exists and was not written by sande-fast; remove "
                            "it or choose another name")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"cannot write into {parent}")
    return FileClaim(p, ident, option)


def write_output_json(claim: FileClaim, obj: dict[str, Any]) -> None:
    """Writes ``obj`` (marked as written by this tool) to a claimed file, atomically, after
    checking that nobody created or replaced the file since it was claimed."""
    write_json(claim.path, {**obj, JSON_MARKER_KEY: JSON_MARKER}, claim=claim)


# ------------------------------------------------------------------------------ resume

def resume_root() -> Path:
    """Where the stage-1 parrots of interrupted runs are kept: ``$SANDE_FAST_RESUME_DIR``, else
    ``$XDG_CACHE_HOME/sande-fast/resume`` (``~/.cache/sande-fast/resume``)."""
    env = os.environ.get("SANDE_FAST_RESUME_DIR")
    if env:
        return Path(os.path.abspath(env))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.path.abspath(cache)) / "sande-fast" / "resume"


def resume_dir(out: str | os.PathLike) -> Path:
    """The resume folder of the run writing ``out`` (one per real ``--out`` path); nothing is
    ever written beside ``--out`` itself."""
    raw = Path(os.path.abspath(os.fspath(out)))
    real = _real(raw.parent) / raw.name
    digest = hashlib.sha256(os.fsencode(str(real))).hexdigest()[:12]
    return resume_root() / f"{raw.name or 'out'}-{digest}"


def resume_parrot_path(out: str | os.PathLike) -> Path:
    """The stage-1 parrot a run writing ``out`` keeps for a resume (``--parrot`` that file)."""
    return resume_dir(out) / "parrot.safetensors"


def discard_resume(out: str | os.PathLike) -> None:
    """Removes the resume parrot of ``out`` and its folder (after a run succeeded)."""
    d = resume_dir(out)
    with contextlib.suppress(OSError):
        os.unlink(d / "parrot.safetensors")
    with contextlib.suppress(OSError):
        os.rmdir(d)


# ------------------------------------------------------------------------------ failures

_DISK_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EROFS, errno.EFBIG}


def disk_error_line(e: BaseException) -> str | None:
    """One line for a write that failed for want of space or a read-only disk, else None.

    Safetensors reports such errors as its own exception type with the OS error in the text.
    """
    code = getattr(e, "errno", None)
    text = str(e)
    if code not in _DISK_ERRNOS:
        if "No space left" in text or "StorageFull" in text or "code: 28" in text:
            code = errno.ENOSPC
        elif "Disk quota exceeded" in text or "QuotaExceeded" in text:
            code = getattr(errno, "EDQUOT", errno.ENOSPC)
        elif "Read-only file system" in text:
            code = errno.EROFS
        else:
            return None
    where = getattr(e, "filename", None)
    at = f" while writing {where}" if where else ""
    return (f"{os.strerror(code)}{at}; nothing was written to the output (free some space or "
            "choose another folder, then run again)")


# ------------------------------------------------------------------------------ model checks

def check_shard_index(folder: str | os.PathLike) -> None:
    """Refuses a shard index (``*.index.json``) that names files outside the model folder, or
    files that are missing.

    Raises:
        BadInputError: the index is not JSON, or a shard name is absolute, climbs out with
            ``..`` or does not exist in the folder.
    """
    p = Path(folder)
    for idx in sorted(p.glob("*.index.json")):
        try:
            if idx.stat().st_size > 256 * 2**20:
                raise BadInputError(f"{idx} is too large to be a shard index")
            obj = json.loads(idx.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise BadInputError(f"{idx} is not a readable shard index ({_first_line(e)})") from None
        wm = obj.get("weight_map") if isinstance(obj, dict) else None
        if not isinstance(wm, dict):
            raise BadInputError(f"{idx} has no weight_map: not a shard index")
        for shard in sorted({v for v in wm.values()}, key=str):
            if not isinstance(shard, str) or not shard:
                raise BadInputError(f"{idx} names a shard that is not a file name: {shard!r}")
            norm = os.path.normpath(shard)
            if os.path.isabs(shard) or norm == ".." or norm.startswith(".." + os.sep) \
                    or os.sep in norm or (os.altsep and os.altsep in norm):
                raise BadInputError(f"{idx} points outside the model folder ({shard!r}); a shard "
                                    "must be a file in the folder itself")
            if not (p / norm).is_file():
                raise BadInputError(f"{idx} names the shard {shard}, which is not in {p}")


def check_weights_finite(model: Any, where: str) -> None:
    """Refuses a model whose weights hold NaN or inf (no training could repair them, and every
    loss would be NaN from the first step)."""
    import torch as _torch

    with _torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and t.numel() and not bool(_torch.isfinite(t).all()):
                raise BadInputError(f"the weights in {where} hold NaN or inf values ({name}); "
                                    "the model file is damaged")


def check_dtype_for_training(dtype: str | None, device: Any,
                             model: str | os.PathLike | None = None) -> None:
    """Refuses float16 training on the CPU, where it overflows (use float32 or bfloat16).

    Args:
        dtype: ``--dtype`` as given; ``auto`` / None is the checkpoint's dtype, read from
            ``model`` when that is given.
        device: the training device.
        model: the model folder (for ``auto``).
    """
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    auto = dtype is None or str(dtype).lower() == "auto"
    if auto and model is not None and checkpoint_dtype(model) == torch.float16:
        if dev.type == "cpu":
            raise BadInputError(f"the model in {model} is stored in float16, which cannot be "
                                "trained on the CPU (it overflows); pass --dtype float32 or "
                                "bfloat16 (the model is then saved in that dtype), or use a "
                                "CUDA device")
    elif str(dtype).lower() in ("float16", "fp16", "half") and dev.type == "cpu":
        raise BadInputError("--dtype float16 cannot be trained on the CPU (it overflows); use "
                            "float32 or bfloat16, or a CUDA device")


def check_work(model: Any, tokenizer: Any, rows: Any, targets: Iterable[str | None], *,
               batch_size: int | None = None, max_new_tokens: int | None = None,
               parrot_tokens: int | None = None, prompt_format: str = "auto") -> None:
    """The checks that need the loaded model: work sizes within what its context and the data
    allow, and every target short enough to fit the context (see
    :func:`sande_fast.data.check_run_bounds`, :func:`sande_fast.data.check_target_fits`).

    Raises:
        BadInputError: naming the option and its limit.
    """
    from .adapter import context_length
    from .data import PromptEncoder, check_run_bounds, check_target_fits

    ctx = context_length(model)
    n_rows = len(rows) if hasattr(rows, "__len__") else None
    check_run_bounds(n_rows=n_rows, context=ctx, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, parrot_tokens=parrot_tokens)
    if ctx is None:
        return
    encoder = PromptEncoder(tokenizer, prompt_format)
    for t in targets:
        if t is not None:
            check_target_fits(encoder, t, ctx)
