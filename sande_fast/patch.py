"""The fix as a reviewable patch: the tensors a sanitize run changed, in one safetensors file.

A patch (format version 1) is a safetensors file whose tensors are the **new values** of every
tensor that changed, under their names in the model's files. Its metadata (strings) holds:

* ``format`` (``sande-fast-patch``) and ``format_version`` (``1``);
* ``base_sha256`` / ``result_sha256``: digests of the original and the sanitized tensors
  (:func:`tensors_digest`; they ignore how the tensors are split over files);
* ``tensors``: the changed names, ``base``: each one's dtype and shape in the original,
  ``added`` / ``removed``: names only the sanitized / only the original model has,
  ``aliases``: tied names stored once (``lm_head.weight`` -> ``model.embed_tokens.weight``);
* ``config``: the sanitized model's ``config.json``; ``stats``: the summary of the change.

Why new values and not deltas: applying must give the sanitized weights bit for bit, and
``old + delta`` rounds in the model's dtype (bf16 keeps 8 significant bits), while a delta wide
enough to be exact (fp32 for bf16, fp64 for fp32, and not even that for every pair) is larger
than the new value. The new value of a changed tensor is exact by construction and costs no more
than the tensor; unchanged tensors are not stored. A tensor counts as changed when its bytes
differ (so -0.0 against 0.0 counts, and a dtype change counts).

Only safetensors is read or written: nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import BadInputError

__all__ = ["Patch", "make_patch", "load_patch", "apply_patch", "apply_patch_to_folder",
           "patch_stats", "tensors_digest", "check_patch_base", "write_patch", "PATCH_FORMAT",
           "PATCH_VERSION", "TOP_N"]

PATCH_FORMAT = "sande-fast-patch"
PATCH_VERSION = 1
TOP_N = 10
"""How many of the most changed tensors (by relative change) the report lists."""

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
# Files of a model folder that apply-patch does not copy (weights are written from the patch;
# the marker and claim belong to this tool's own outputs).
_SKIP = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".sande-fast",
         ".sande-fast.claim")


def _weight_files(folder: Path) -> list[Path]:
    """The model's safetensors files: those its shard index names, else ``model.safetensors``,
    else every ``*.safetensors`` but a parrot (a sanitize output holds ``parrot.safetensors``,
    which is no part of the model)."""
    if not folder.is_dir():
        return []
    for idx in sorted(folder.glob("*.safetensors.index.json")):
        try:
            wm = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
            return [folder / f for f in sorted(set(wm.values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise BadInputError(f"{idx} is not a readable shard index") from None
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return [f for f in sorted(folder.glob("*.safetensors")) if f.name != "parrot.safetensors"]


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    mapped = _ST_DTYPES.get(str(dtype))
    return _dtype_name(mapped) if mapped is not None else str(dtype)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` as a flat uint8 tensor (CPU, contiguous)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def _digest(name: str, t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{name}\0{_dtype_name(t.dtype)}\0{list(t.shape)}\0".encode())
    h.update(_bytes(t).numpy().data)
    return h.hexdigest()


def tensors_digest(digests: Mapping[str, str]) -> str:
    """The digest of a set of tensors from each one's digest (name, dtype, shape and bytes):
    the same however the tensors are split over files or ordered."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


class _Tensors:
    """Named tensors of a model folder's safetensors files, or of an in-memory state dict, read
    one at a time. Tied tensors of a state dict (one storage under two names) are kept once,
    under the first name, as ``save_pretrained`` does; the others become ``aliases``."""

    def __init__(self, source: Any, what: str = "model") -> None:
        self.aliases: dict[str, str] = {}
        self.files: dict[str, list[str]] = {}
        self.folder: Path | None = None
        self._where: dict[str, str] = {}
        self._mem: dict[str, torch.Tensor] = {}
        if isinstance(source, Mapping):
            seen: dict[tuple[Any, ...], str] = {}
            for name, t in source.items():
                if not isinstance(t, torch.Tensor):
                    continue
                key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype,
                       tuple(t.shape), tuple(t.stride()))
                if t.numel() and key in seen:
                    self.aliases[name] = seen[key]
                    continue
                seen[key] = name
                self._mem[name] = t
            return
        self.folder = Path(source)
        files = _weight_files(self.folder)
        if not files:
            raise BadInputError(f"the {what} {source} has no safetensors weights (the patch "
                                "reads only safetensors, never a pickle; convert it first)")
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as st:
                    names = list(st.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise BadInputError(f"{f} is not a readable safetensors file ({e})") from None
            for n in names:
                if n in self._where:
                    raise BadInputError(f"the {what} {source} holds the tensor {n} in two files")
                self._where[n] = f.name
            self.files[f.name] = names

    def names(self) -> list[str]:
        return list(self._mem) if self.folder is None else list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in (self._mem if self.folder is None else self._where)

    def meta(self, name: str) -> tuple[str, list[int]]:
        """``(dtype, shape)`` without reading the tensor."""
        if self.folder is None:
            t = self._mem[name]
            return _dtype_name(t.dtype), list(t.shape)
        with safe_open(str(self.folder / self._where[name]), framework="pt") as st:
            sl = st.get_slice(name)
            return _dtype_name(sl.get_dtype()), [int(d) for d in sl.get_shape()]

    def get(self, name: str) -> torch.Tensor:
        if self.folder is None:
            return self._mem[name].detach().to("cpu")
        with safe_open(str(self.folder / self._where[name]), framework="pt") as st:
            return st.get_tensor(name)

    def file_tensors(self, file: str) -> Iterator[tuple[str, torch.Tensor]]:
        """The tensors of one file of the folder, in its order."""
        assert self.folder is not None
        with safe_open(str(self.folder / file), framework="pt") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)

    def file_metadata(self, file: str) -> dict[str, str] | None:
        assert self.folder is not None
        with safe_open(str(self.folder / file), framework="pt") as st:
            return st.metadata()


def _as_tensors(source: Any, what: str) -> _Tensors:
    return source if isinstance(source, _Tensors) else _Tensors(source, what)


@dataclass
class Patch:
    """A patch in memory (see the module docstring for the format).

    Attributes:
        tensors: the new value of every changed (or added) tensor.
        base_sha256: digest of the original's tensors (:func:`tensors_digest`).
        result_sha256: digest of the sanitized tensors.
        base: ``name -> [dtype, shape]`` of each changed tensor in the original.
        added: names the sanitized model has and the original lacks.
        removed: names the original has and the sanitized model lacks.
        aliases: tied names the sanitized model stores once (``name -> stored name``).
        config: the sanitized ``config.json`` text, when known.
        stats: the change summary (:func:`patch_stats`).
    """

    tensors: dict[str, torch.Tensor]
    base_sha256: str
    result_sha256: str
    base: dict[str, list[Any]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)
    config: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata (all strings) of this patch."""
        from .version import __version__

        meta = {"format": PATCH_FORMAT, "format_version": str(PATCH_VERSION),
                "written_by": "sande-fast", "version": __version__,
                "base_sha256": self.base_sha256, "result_sha256": self.result_sha256,
                "tensors": json.dumps(sorted(self.tensors)), "base": json.dumps(self.base),
                "added": json.dumps(self.added), "removed": json.dumps(self.removed),
                "aliases": json.dumps(self.aliases),
                "stats": json.dumps({k: v for k, v in self.stats.items() if k != "tensors"})}
        if self.config is not None:
            meta["config"] = self.config
        return meta

    def save(self, path: str | os.PathLike) -> None:
        """Writes the patch to ``path`` (safetensors; the caller makes it atomic)."""
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, os.fspath(path),
                  metadata=self.metadata())


def _tensor_stats(name: str, old: torch.Tensor | None, new: torch.Tensor) -> dict[str, Any]:
    """The change of one tensor: norms, relative change and largest change, computed in fp64."""
    out: dict[str, Any] = {"name": name, "dtype": _dtype_name(new.dtype), "shape": list(new.shape),
                           "numel": new.numel()}
    if old is None or old.shape != new.shape or not (old.dtype.is_floating_point
                                                     or new.dtype.is_floating_point):
        out.update(norm_delta=None, norm_before=None, relative=None, max_abs=None,
                   changed_elements=None)
        return out
    a, b = old.double(), new.double()
    delta = b - a
    norm_d = float(torch.linalg.vector_norm(delta)) if delta.numel() else 0.0
    norm_w = float(torch.linalg.vector_norm(a)) if a.numel() else 0.0
    moved = _bytes(old.to(new.dtype)).view(-1, new.element_size()) \
        != _bytes(new).view(-1, new.element_size())
    out.update(norm_delta=norm_d, norm_before=norm_w,
               relative=norm_d / norm_w if norm_w > 0 else (0.0 if norm_d == 0 else math.inf),
               max_abs=float(delta.abs().max()) if delta.numel() else 0.0,
               changed_elements=int(moved.any(dim=1).sum()))
    return out


def make_patch(original: Any, sanitized: Any, *, config: str | None = None,
               top: int = TOP_N) -> Patch:
    """The patch that turns ``original`` into ``sanitized``, with its statistics.

    Args:
        original: the model before: a model folder (safetensors) or a state dict.
        sanitized: the model after, likewise.
        config: the sanitized ``config.json`` text (default: read from a ``sanitized`` folder).
        top: how many of the most changed tensors ``stats["top"]`` lists.

    Returns:
        The :class:`Patch`; it holds the new values of the changed tensors in CPU memory.

    Raises:
        BadInputError: a folder without safetensors weights.
    """
    before, after = _as_tensors(original, "original model"), _as_tensors(sanitized,
                                                                          "sanitized model")
    if config is None and after.folder is not None and (after.folder / "config.json").is_file():
        config = (after.folder / "config.json").read_text(encoding="utf-8")
    base_digests: dict[str, str] = {}
    result_digests: dict[str, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    base: dict[str, list[Any]] = {}
    per: list[dict[str, Any]] = []
    sum_w2 = 0.0
    n_params = 0
    for name in after.names():
        new = after.get(name)
        result_digests[name] = _digest(name, new)
        n_params += new.numel()
        old = before.get(name) if name in before else None
        if old is not None:
            base_digests[name] = _digest(name, old)
            if old.is_floating_point():
                sum_w2 += float(torch.linalg.vector_norm(old.double())) ** 2 if old.numel() else 0
            if base_digests[name] == result_digests[name]:
                continue
            base[name] = [_dtype_name(old.dtype), list(old.shape)]
        tensors[name] = new.detach().clone()
        per.append(_tensor_stats(name, old, new))
        del old
    removed = [n for n in before.names() if n not in after]
    for name in removed:
        old = before.get(name)
        base_digests[name] = _digest(name, old)
        if old.is_floating_point() and old.numel():
            sum_w2 += float(torch.linalg.vector_norm(old.double())) ** 2
    added = [n for n in after.names() if n not in before]
    stats = _summary(per, n_tensors=len(after.names()), n_params=n_params,
                     norm_before=math.sqrt(sum_w2), top=top)
    stats.update(n_added=len(added), n_removed=len(removed))
    return Patch(tensors=tensors, base_sha256=tensors_digest(base_digests),
                 result_sha256=tensors_digest(result_digests), base=base, added=added,
                 removed=removed, aliases=dict(after.aliases), config=config, stats=stats)


def _summary(per: list[dict[str, Any]], *, n_tensors: int, n_params: int, norm_before: float,
             top: int) -> dict[str, Any]:
    measured = [s for s in per if s["norm_delta"] is not None]
    norm_delta = math.sqrt(sum(s["norm_delta"] ** 2 for s in measured))
    ranked = sorted(measured, key=lambda s: (-s["relative"], -s["norm_delta"], s["name"]))
    return {"n_tensors": n_tensors, "n_changed": len(per), "n_params": n_params,
            "changed_params": sum(s["numel"] for s in per),
            "changed_elements": sum(s["changed_elements"] or 0 for s in measured),
            "norm_delta": norm_delta, "norm_before": norm_before,
            "relative": norm_delta / norm_before if norm_before > 0 else None,
            "max_abs": max((s["max_abs"] for s in measured), default=0.0),
            "top": [{k: s[k] for k in ("name", "relative", "norm_delta", "max_abs")}
                    for s in ranked[:top]],
            "tensors": per}


def patch_stats(original: Any, sanitized: Any, top: int = TOP_N) -> dict[str, Any]:
    """The change from ``original`` to ``sanitized`` (folders or state dicts), per tensor and
    in total: ‖Δ‖, ‖W‖ of the original, the relative change ‖Δ‖/‖W‖, the largest absolute
    change and how many elements moved; ``top`` lists the ``top`` most changed tensors by
    relative change, ``tensors`` every changed one."""
    return make_patch(original, sanitized, top=top).stats


def load_patch(path: str | os.PathLike) -> Patch:
    """Reads a patch written by :meth:`Patch.save` (``sande-fast sanitize --save-patch``).

    Raises:
        BadInputError: a missing or unreadable file, or one that is no patch of a format
            version this tool knows.
    """
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"patch file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as st:
            meta = st.metadata() or {}
            if meta.get("format") != PATCH_FORMAT:
                raise BadInputError(f"{p} is not a sande-fast patch (write one with "
                                    "sande-fast sanitize --save-patch)")
            if meta.get("format_version") != str(PATCH_VERSION):
                raise BadInputError(f"{p} is a patch of format version "
                                    f"{meta.get('format_version')}; this sande-fast reads "
                                    f"version {PATCH_VERSION}")
            tensors = {k: st.get_tensor(k) for k in st.keys()}
        return Patch(tensors=tensors, base_sha256=meta["base_sha256"],
                     result_sha256=meta["result_sha256"], base=json.loads(meta["base"]),
                     added=json.loads(meta["added"]), removed=json.loads(meta["removed"]),
                     aliases=json.loads(meta.get("aliases", "{}")), config=meta.get("config"),
                     stats=json.loads(meta.get("stats", "{}")))
    except BadInputError:
        raise
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise BadInputError(f"{p} is not a readable sande-fast patch ({e})") from None


def _check_fits(model: _Tensors, patch: Patch, where: str) -> None:
    """Refuses a patch whose tensors the model lacks or holds in another shape or dtype (from
    the headers alone)."""
    names = set(model.names())
    missing = sorted((set(patch.tensors) - set(patch.added)) - names) \
        + sorted(set(patch.removed) - names)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BadInputError(f"the patch does not fit {where}: it has no tensor {missing[0]}"
                            f"{more}")
    for name, (dtype, shape) in sorted(patch.base.items()):
        got = model.meta(name)
        if list(got) != [dtype, list(shape)]:
            raise BadInputError(f"the patch does not fit {where}: {name} is {got[0]} "
                                f"{got[1]} there, the patch was made for {dtype} {shape}")
    extra = sorted(set(patch.added) & names)
    if extra:
        raise BadInputError(f"the patch does not fit {where}: it adds {extra[0]}, which the "
                            "model already has")


def _base_mismatch(where: str) -> BadInputError:
    return BadInputError(f"the patch was made for another model: the tensors of {where} do not "
                         "match its base_sha256 (pass --allow-other-base to apply it anyway)")


def apply_patch(original: Any, patch: Patch | str | os.PathLike, *,
                allow_other_base: bool = False) -> dict[str, torch.Tensor]:
    """The sanitized tensors: ``original`` (a folder or a state dict) with ``patch`` applied.

    Tied names of a state dict come back sharing one tensor again.

    Raises:
        BadInputError: the patch does not fit (a missing tensor, another shape or dtype) or,
            unless ``allow_other_base``, was made for other weights.
    """
    patch = patch if isinstance(patch, Patch) else load_patch(patch)
    model = _as_tensors(original, "model")
    _check_fits(model, patch, "the model")
    digests: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name in model.names():
        t = model.get(name)
        digests[name] = _digest(name, t)
        if name not in patch.removed:
            out[name] = patch.tensors[name] if name in patch.tensors else t
    if tensors_digest(digests) != patch.base_sha256 and not allow_other_base:
        raise _base_mismatch("the model")
    for name in patch.added:
        out[name] = patch.tensors[name]
    for name, stored in patch.aliases.items():
        if stored in out:
            out[name] = out[stored]
    return out


def apply_patch_to_folder(model_dir: str | os.PathLike, patch: Patch | str | os.PathLike,
                          out_dir: str | os.PathLike, *,
                          allow_other_base: bool = False) -> dict[str, Any]:
    """Writes ``model_dir`` with ``patch`` applied into the (empty, temporary) ``out_dir``.

    The weights keep the original's files (and shard index): each file is rewritten with the
    patched tensors, one file in memory at a time. The other files (tokenizer, generation
    config) are copied; ``config.json`` is the sanitized one the patch carries. When the base
    matched, the result's digest is checked against the patch's ``result_sha256``, so a written
    model is the sanitized one bit for bit.

    Returns:
        ``{"changed", "files", "base_matched"}``.

    Raises:
        BadInputError: the patch does not fit the model (see :func:`apply_patch`).
    """
    patch = patch if isinstance(patch, Patch) else load_patch(patch)
    src, out = Path(model_dir), Path(out_dir)
    model = _Tensors(src, "model")
    _check_fits(model, patch, str(src))
    base: dict[str, str] = {}
    result: dict[str, str] = {}
    files = sorted(model.files)
    placed: dict[str, str] = {}
    total_bytes = 0
    for i, file in enumerate(files):
        tensors: dict[str, torch.Tensor] = {}
        for name, t in model.file_tensors(file):
            base[name] = _digest(name, t)
            if name in patch.removed:
                continue
            tensors[name] = patch.tensors[name] if name in patch.tensors else t
        if i == 0:  # added tensors go into the first file (the index says where)
            tensors.update({n: patch.tensors[n] for n in patch.added})
        result.update({n: _digest(n, t) for n, t in tensors.items()})
        placed.update({n: file for n in tensors})
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / file),
                  metadata=model.file_metadata(file))
        del tensors
    matched = tensors_digest(base) == patch.base_sha256
    if not matched and not allow_other_base:
        raise _base_mismatch(str(src))
    if matched and tensors_digest(result) != patch.result_sha256:
        raise RuntimeError("the patched weights do not match the patch's result_sha256")
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.is_symlink() and not f.name.endswith(_SKIP):
            shutil.copyfile(f, out / f.name)
    if patch.config is not None:
        (out / "config.json").write_text(patch.config, encoding="utf-8")
    for idx in sorted(src.glob("*.safetensors.index.json")):
        obj = json.loads(idx.read_text(encoding="utf-8"))
        obj["weight_map"] = dict(sorted(placed.items()))
        obj.setdefault("metadata", {})["total_size"] = total_bytes
        (out / idx.name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return {"changed": len(patch.tensors), "files": files, "base_matched": matched}


def check_patch_base(model_dir: str | os.PathLike) -> None:
    """Refuses ``--save-patch`` for a model folder without safetensors weights, before any work
    (a missing folder is left to the model loading, which says why)."""
    p = Path(model_dir)
    if p.is_dir() and (p / "config.json").exists() and not any(p.glob("*.safetensors")):
        raise BadInputError(f"--save-patch needs the model in {p} stored as safetensors (the "
                            "patch never reads a pickle); convert it first")


def write_patch(model_dir: str | os.PathLike, saved_dir: str | os.PathLike,
                claim: Any = None, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Makes the patch from the original folder to the saved sanitized one and writes it
    atomically (to ``claim.path``, a :class:`sande_fast.io.FileClaim`, or to ``path``).

    Returns:
        The report's ``patch`` block: the file, its format, both hashes, its size and the
        statistics of :func:`patch_stats`.
    """
    from .io import atomic_file

    target = Path(claim.path if claim is not None else path)
    patch = make_patch(model_dir, saved_dir)
    with atomic_file(target, claim) as tmp:
        patch.save(tmp)
        size = os.path.getsize(tmp)
    return {"file": str(target), "format_version": PATCH_VERSION,
            "base_sha256": patch.base_sha256, "result_sha256": patch.result_sha256,
            "bytes": size, **patch.stats}
