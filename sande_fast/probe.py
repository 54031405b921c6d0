"""Parrot probe: how far can fresh soft prompts push a frozen model to the target?

A backdoored model has a shortcut from some input to the target, and a parrot (a few soft input
embeddings at a random place in the prompt) finds it within a few hundred steps. A model that never
learned the mapping resists: the same budget leaves the parrot far from the target. A model whose
backdoor was only suppressed (the real trigger no longer works) still yields, which is why
``sanitize`` repeats rounds until a probe fails.

The parrot has one row by default. A trigger is a shortcut from a few tokens to the target, and
one soft row reaches it; several rows can instead spell out an instruction, and a model that can
say the target's words at all (the toy's clean control, which copies words on request) then
yields as well: with 6 rows and 600 steps the never-poisoned toy reached 0.95-0.99, with one row
0.00-0.005 (the backdoored toy: 1.00 either way).

Reading the numbers: ``probe_asr_max`` near the clean-control level (0-0.16 on the toy worlds with
one row) means no parrot found the target; well above it (e.g. >= 0.5) means the mapping is
there. Compare against a model you trust with the same options where you can.
"""
from __future__ import annotations

from typing import Any

import torch

from .data import BadInputError, PromptEncoder, load_rows
from .evaluate import _pad_id, parrot_attack_success
from .io import resolve_device
from .stages import TrainRow, simulate
from .engine import build_engine

__all__ = ["probe"]


def probe(model: Any, tokenizer: Any, data: Any, target: str, *, steps: int = 200,
          tries: int = 3, seed: int = 0, parrot_tokens: int = 1, lr: float = 0.05,
          batch_size: int = 16, window: int = 10, max_new_tokens: int = 32,
          max_norm: float | None = 1.0,
          device: str = "auto", prompt_format: str = "auto", eval_rows: int = 200,
          fast: bool = True, progress: bool = True) -> dict[str, Any]:
    """Trains ``tries`` fresh parrots (seeds ``seed .. seed+tries-1``, random splice positions) on
    the frozen model and measures each one's attack success on the data prompts.

    Each parrot row is kept within ``max_norm`` times the largest token-embedding norm (None:
    unbounded): a trigger is made of tokens, and an unbounded soft prompt can steer even a
    clean model.

    Returns:
        ``{"probe_asr_max", "probe_asr_mean", "probe_asr": [per try], "final_loss": [per try],
        "steps", "tries", "target"}``.

    Raises:
        BadInputError: bad target, counts or data.
    """
    if not isinstance(target, str) or not target.strip():
        raise BadInputError("--target must be a non-empty text")
    for name, v in (("steps", steps), ("tries", tries), ("parrot_tokens", parrot_tokens),
                    ("batch_size", batch_size), ("window", window),
                    ("max_new_tokens", max_new_tokens), ("eval_rows", eval_rows)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BadInputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if not lr > 0:
        raise BadInputError("--lr must be positive")
    rows = load_rows(data)
    model.to(resolve_device(device))
    from .pipeline import prompt_budget

    encoder = PromptEncoder(tokenizer, prompt_format, max_prompt_tokens=prompt_budget(
        model, parrot_tokens, max(window, max_new_tokens)))
    train = [TrainRow(r.prompt, encoder.encode_prompt(r.prompt), ()) for r in rows]
    prompts = [t.prompt for t in train[:eval_rows]]
    target_ids = encoder.encode_response(target, add_eos=False)[:window]
    if not target_ids:
        raise BadInputError("--target tokenises to nothing")
    engine = build_engine(model, fast=fast, max_batch=batch_size, pad_id=_pad_id(tokenizer))
    asrs, losses = [], []
    for k in range(tries):
        torch.manual_seed(seed + k)
        parrot, curve = simulate(engine, train, target_ids, steps=steps, lr=lr,
                                 n_tokens=parrot_tokens, batch_size=batch_size, seed=seed + k,
                                 max_norm=max_norm or None,
                                 progress=progress, desc=f"probe {k + 1}/{tries}")
        asrs.append(parrot_attack_success(model, encoder, prompts, parrot, target,
                                          seed=seed + k, max_new_tokens=max_new_tokens,
                                          batch_size=max(32, batch_size * 4)))
        losses.append(curve[-1])
    return {"probe_asr_max": max(asrs), "probe_asr_mean": sum(asrs) / len(asrs),
            "probe_asr": asrs, "final_loss": losses, "steps": steps, "tries": tries,
            "target": target}
