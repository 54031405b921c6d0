"""LoRA training (``--train lora``) and PEFT adapter folders, without peft at run time.

``--train lora`` wraps the chosen linear layers in :class:`LoraLinear` (the frozen layer plus a
trainable low-rank update ``B @ A * alpha / rank``) and freezes every other weight, so stage 2
keeps gradients and optimizer state for the LoRA matrices only. The wrapper replaces the module
in place, so the fast path (which calls the decoder layers itself) and the plain path both run
through it; the LM head is never wrapped, since the fused loss reads its weight directly.

The result is written in PEFT's adapter format (``adapter_config.json`` +
``adapter_model.safetensors`` with PEFT's key names), so ``peft.PeftModel.from_pretrained(base,
folder)`` loads it; peft itself is only needed to read it back (the ``lora`` extra). A PEFT LoRA
adapter folder is also accepted as ``--model``: its base model is loaded (never with remote code)
and the adapter is attached as :class:`LoraLinear` layers, so ``--train lora`` continues training
that adapter (its own rank, alpha and modules) and ``--train full`` merges it first.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .errors import BadInputError

__all__ = ["LoraLinear", "LoraInfo", "DEFAULT_MODULES", "attach_lora", "lora_layers",
           "merge_lora", "prepare_training", "save_adapter", "adapter_state_dict",
           "is_adapter_folder", "adapter_base", "load_adapter_model", "ADAPTER_CONFIG",
           "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's saved keys: the PeftModel wraps a LoraModel ("base_model") that holds the HF model
# ("model"), and the adapter name ("default") is left out of the file.
KEY_PREFIX = "base_model.model."
# The attention and MLP projections of Llama-style models (Llama, Qwen2, Mistral, SmolLM2).
DEFAULT_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: ``base(x) + B(A(x)) * scaling``.

    The LoRA matrices are kept in fp32 whatever the base dtype (as PEFT does by default): they
    are small, and a bf16 update of a zero-initialised ``B`` would lose the first steps.

    Args:
        base: an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2; weight ``[in, out]``).
        rank: rank of the update.
        alpha: the update is scaled by ``alpha / rank``.
        dropout: dropout on the LoRA input while the update trains (0: none).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.fan_in_fan_out = not isinstance(base, nn.Linear)  # Conv1D stores [in, out]
        w = base.weight
        n_in, n_out = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1],
                                                                            w.shape[0])
        self.base_layer = base
        self.lora_A = nn.Linear(n_in, rank, bias=False, device=w.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, n_out, bias=False, device=w.device, dtype=torch.float32)
        # PEFT's default init: A as nn.Linear does (Kaiming uniform), B zero, so the wrapped
        # model starts exactly where the base model is.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
        self.scaling = self.alpha / rank

    # Model code that reads a projection's weight or bias (dtype checks) sees the base layer's.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = x.to(self.lora_A.weight.dtype)
        if self.dropout and torch.is_grad_enabled() and self.lora_A.weight.requires_grad:
            # Only while the update trains: the model sits in eval mode during a run, and the
            # measurement, the probe and stage 1 (all frozen) must see the deterministic model.
            h = nn.functional.dropout(h, self.dropout, training=True)
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).to(out.dtype)

    def delta(self) -> torch.Tensor:
        """The update of the base weight, in the base weight's layout (fp32)."""
        d = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return d.T if self.fan_in_fan_out else d


@dataclass(frozen=True)
class LoraInfo:
    """What the report says about a LoRA run."""

    rank: int
    alpha: float
    dropout: float
    modules: tuple[str, ...]
    layers: int
    trainable_params: int
    total_params: int
    base_model: str | None
    continued: bool  # an adapter given as --model was trained further

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "modules": list(self.modules), "layers": self.layers,
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "base_model": self.base_model, "continued_adapter": self.continued}


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The :class:`LoraLinear` layers of ``model`` by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def _linear_kinds() -> tuple[type, ...]:
    kinds: tuple[type, ...] = (nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover - every supported transformers has it
        pass
    return kinds


def _matches(name: str, targets: Sequence[str] | str) -> bool:
    """PEFT's rule: a regex string must match the whole name; a list entry must equal the name
    or be its dotted suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def parse_modules(text: str) -> tuple[str, ...]:
    """``--lora-modules`` as a tuple of names (comma separated)."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise BadInputError("--lora-modules must name at least one module")
    return names


def attach_lora(model: nn.Module, modules: Sequence[str] | str, rank: int, alpha: float,
                dropout: float = 0.0) -> dict[str, LoraLinear]:
    """Wraps every linear layer that ``modules`` names (PEFT's matching) in :class:`LoraLinear`.

    Raises:
        BadInputError: a name matches no module, a matched module is no linear layer, or it is
            the LM head (the fused loss reads the head's weight directly, so a wrapped head
            would be trained on the plain path only).
    """
    kinds = _linear_kinds()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    named = [(n, m) for n, m in model.named_modules() if n]
    chosen = [(n, m) for n, m in named if _matches(n, modules)]
    if not isinstance(modules, str):
        missing = [t for t in modules if not any(_matches(n, [t]) for n, _ in named)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in named
                             if isinstance(m, kinds) and m is not head})
            raise BadInputError(f"--lora-modules: the model has no module {', '.join(missing)}; "
                                f"its linear layers are {', '.join(linear) or 'none'}")
    elif not chosen:
        raise BadInputError(f"--lora-modules: the pattern {modules!r} matches no module")
    for name, mod in chosen:
        if mod is head:
            raise BadInputError(f"--lora-modules: {name} is the LM head, which LoRA does not "
                                "train here; name the attention and MLP projections")
        if isinstance(mod, LoraLinear):
            continue
        if not isinstance(mod, kinds):
            raise BadInputError(f"--lora-modules: {name} is a {type(mod).__name__}, not a "
                                "linear layer")
    out: dict[str, LoraLinear] = {}
    for name, mod in chosen:
        if isinstance(mod, LoraLinear):
            out[name] = mod
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoraLinear(mod, rank, alpha, dropout)
        setattr(parent, child, wrapped)
        out[name] = wrapped
    return out


def merge_lora(model: nn.Module) -> int:
    """Folds every :class:`LoraLinear` into its base weight and puts the base layer back;
    returns how many layers were merged."""
    layers = lora_layers(model)
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.base_layer
            base.weight.add_(layer.delta().to(base.weight.dtype))
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, base)
    if hasattr(model, "sande_lora_base"):
        del model.sande_lora_base
    return len(layers)


def _model_path(model: nn.Module) -> str | None:
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not name:
        return None
    return os.path.abspath(name) if os.path.isdir(name) else name


def prepare_training(model: nn.Module, cfg: Any) -> LoraInfo | None:
    """Readies ``model`` for ``cfg.train``: ``full`` merges any attached adapter (an adapter
    folder given as ``--model``) and returns None; ``lora`` attaches the LoRA layers (or keeps
    those of an adapter given as ``--model``), freezes every other weight and returns what the
    report says about them.

    Raises:
        BadInputError: bad ``--lora-modules``.
    """
    if cfg.train != "lora":
        merge_lora(model)
        return None
    existing = lora_layers(model)
    continued = bool(existing)
    if continued:
        # An adapter given as --model is trained further with its own shape, so the result is
        # still an adapter of the same base model.
        first = next(iter(existing.values()))
        rank, alpha = first.rank, first.alpha
        modules = tuple(sorted({n.rsplit(".", 1)[-1] for n in existing}))
        layers = existing
        for layer in layers.values():
            layer.dropout = cfg.lora_dropout
    else:
        rank, alpha = cfg.lora_rank, cfg.lora_alpha
        modules = parse_modules(cfg.lora_modules)
        layers = attach_lora(model, modules, rank, alpha, cfg.lora_dropout)
    lora_params = {id(p) for layer in layers.values()
                   for p in (layer.lora_A.weight, layer.lora_B.weight)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora_params)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    base = getattr(model, "sande_lora_base", None) or _model_path(model)
    model.sande_lora_base = base
    return LoraInfo(rank=rank, alpha=alpha, dropout=cfg.lora_dropout, modules=modules,
                    layers=len(layers), trainable_params=trainable, total_params=total,
                    base_model=base, continued=continued)


def base_param_count(model: nn.Module) -> int:
    """Parameters of the model without any attached LoRA matrices (what ``auto`` rates read)."""
    extra = sum(layer.lora_A.weight.numel() + layer.lora_B.weight.numel()
                for layer in lora_layers(model).values())
    return sum(p.numel() for p in model.parameters()) - extra


# -- PEFT's adapter format -------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA matrices under PEFT's saved key names
    (``base_model.model.<module>.lora_A.weight``), contiguous, on the CPU."""
    out = {}
    for name, layer in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            w = getattr(layer, part).weight
            out[f"{KEY_PREFIX}{name}.{part}.weight"] = w.detach().to("cpu").contiguous()
    return out


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT reads back (``LoraConfig`` fields of peft >= 0.13)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    first = next(iter(layers.values()))
    targets = sorted({n.rsplit(".", 1)[-1] for n in layers})
    # PEFT wraps every module whose name ends in a target; a target that also names a module
    # this run left alone (none under attach_lora's rule) would differ, so list full names then.
    named = [n for n, _ in model.named_modules() if n]
    wrapped = set(layers)
    if any(_matches(n, targets) and n not in wrapped and not _inside_lora(n, wrapped)
           for n in named):
        targets = sorted(wrapped)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model if base_model is not None else getattr(
            model, "sande_lora_base", None) or _model_path(model),
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.dropout,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": first.fan_in_fan_out,
        "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def _inside_lora(name: str, wrapped: set[str]) -> bool:
    # The wrapper's own children (q_proj.base_layer, q_proj.lora_A) are no separate targets.
    return any(name.startswith(w + ".") for w in wrapped)


def save_adapter(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None,
                 base_model: str | None = None) -> None:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (and the tokenizer) into
    ``out``, loadable with ``peft.PeftModel.from_pretrained(base, out)``.

    Args:
        base_model: the config's ``base_model_name_or_path`` (default: where the base model
            was loaded from).
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = adapter_config(model, base_model)
    save_file(adapter_state_dict(model), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def _read_adapter_config(folder: Path) -> dict[str, Any]:
    try:
        cfg = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"cannot read {folder / ADAPTER_CONFIG}: {e}") from None
    if not isinstance(cfg, dict):
        raise BadInputError(f"{folder / ADAPTER_CONFIG} does not hold a mapping")
    kind = str(cfg.get("peft_type", "")).upper()
    if kind != "LORA":
        raise BadInputError(f"{folder} holds a {kind or 'untyped'} PEFT adapter; only LoRA "
                            "adapters are read")
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern",
                               "layers_to_transform") if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if cfg.get("use_rslora"):
        unsupported.append("use_rslora")
    if unsupported:
        raise BadInputError(f"{folder / ADAPTER_CONFIG}: {', '.join(unsupported)} is not "
                            "supported (plain LoRA adapters only)")
    r = cfg.get("r")
    targets = cfg.get("target_modules")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise BadInputError(f"{folder / ADAPTER_CONFIG}: 'r' must be a positive integer")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets
                                         and all(isinstance(t, str) for t in targets))):
        raise BadInputError(f"{folder / ADAPTER_CONFIG}: 'target_modules' must be a list of "
                            "module names or a pattern")
    return cfg


def adapter_base(folder: str | os.PathLike, base_model: str | os.PathLike | None = None) -> Path:
    """The base model folder of the adapter in ``folder``: ``base_model`` when given, else the
    config's ``base_model_name_or_path`` (a path relative to the working directory or, failing
    that, to the adapter folder).

    Raises:
        BadInputError: no base is named, or it is no local folder (a hub name is not fetched).
    """
    folder = Path(folder)
    if base_model is not None:
        return Path(base_model)
    name = _read_adapter_config(folder).get("base_model_name_or_path")
    if not isinstance(name, str) or not name:
        raise BadInputError(f"{folder / ADAPTER_CONFIG} names no base model; pass --base-model")
    for candidate in (Path(name), folder / name):
        if candidate.is_dir():
            return candidate
    raise BadInputError(f"the adapter in {folder} names base model {name!r}, which is not a "
                        "local folder; pass --base-model FOLDER")


def load_adapter_model(folder: str | os.PathLike, device: torch.device, *,
                       base_model: str | os.PathLike | None = None, dtype: str | None = None,
                       trust_remote_code: bool = False, progress: bool = True,
                       load_base: Any) -> tuple[Any, Any]:
    """The base model with the PEFT LoRA adapter in ``folder`` attached (as
    :class:`LoraLinear` layers, frozen) and the base model's tokenizer.

    ``load_base`` loads the base folder (:func:`sande_fast.io.load_model`, passed in by it, so
    this module does not import the loader that dispatches to it).

    Only ``adapter_model.safetensors`` is read (a pickled ``adapter_model.bin`` is refused), and
    the base model never runs its own code: the adapter's config chooses which folder is loaded.

    Raises:
        BadInputError: no safetensors weights, an unsupported adapter, weights that do not fit
            the base model, ``trust_remote_code``, or a base model that cannot be found.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if trust_remote_code:
        raise BadInputError("--trust-remote-code is refused with an adapter folder as --model "
                            "(its config chooses the base model that would run)")
    cfg = _read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        found = "adapter_model.bin" if (folder / "adapter_model.bin").exists() else "nothing"
        raise BadInputError(f"{folder} has no {ADAPTER_WEIGHTS} (found {found}); only "
                            "safetensors adapters are read")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise BadInputError(f"cannot read {weights}: {e}") from None
    base = adapter_base(folder, base_model)
    model, tok = load_base(base, device, dtype=dtype, trust_remote_code=False,
                           progress=progress)
    targets = cfg["target_modules"]
    layers = attach_lora(model, targets, cfg["r"], float(cfg.get("lora_alpha", 8)),
                         float(cfg.get("lora_dropout") or 0.0))
    expected = {f"{KEY_PREFIX}{n}.{part}.weight": (layer, part)
                for n, layer in layers.items() for part in ("lora_A", "lora_B")}
    # Older PEFT files may keep the adapter name in the key.
    state = {k.replace(".default.weight", ".weight"): v for k, v in state.items()}
    unknown = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unknown or missing:
        which = unknown or missing
        raise BadInputError(f"the adapter in {folder} does not fit the base model {base}: "
                            f"{'unexpected' if unknown else 'missing'} {which[0]}"
                            f"{f' and {len(which) - 1} more' if len(which) > 1 else ''}")
    with torch.no_grad():
        for key, (layer, part) in expected.items():
            t, w = state[key], getattr(layer, part).weight
            if tuple(t.shape) != tuple(w.shape) or not t.is_floating_point():
                raise BadInputError(f"the adapter in {folder}: {key} has shape "
                                    f"{tuple(t.shape)}, the base model needs {tuple(w.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise BadInputError(f"the adapter in {folder}: {key} holds NaN or inf")
            w.copy_(t.to(w.dtype))
    for p in model.parameters():
        p.requires_grad_(True)  # as a loaded model is; prepare_training decides what trains
    model.sande_lora_base = str(base.resolve())
    return model, tok
