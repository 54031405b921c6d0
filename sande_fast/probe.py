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

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .adapter import context_length
from .data import (EncodedPrompt, PromptEncoder, check_model_and_tokenizer, load_rows,
                   model_stop_ids, text_list)
from .errors import BadInputError
from .evaluate import pad_token_id, parrot_attack_success
from .io import resolve_device
from .options import ProbeConfig, from_keywords, prompt_budget, resolve_prompt_format
from .stages import TrainRow, simulate_many
from .engine import LossEngine
from .engines import build_engine

__all__ = ["probe", "probe_parrots", "probe_parrots_many", "ProbeResult"]


@dataclass
class ProbeResult:
    """What :func:`probe_parrots` found: each try's asr and loss curve, and the strongest try.

    Attributes:
        asr: attack success of each try's parrot, in order of seeds.
        curves: each try's stage-1 loss curve.
        best: index of the strongest try (the first of equals).
        parrots: each try's parrot ``[n_tokens, hidden]``.
    """

    asr: list[float]
    curves: list[list[float]]
    parrots: list[torch.Tensor]

    @property
    def best(self) -> int:
        return max(range(len(self.asr)), key=lambda k: self.asr[k])

    @property
    def asr_max(self) -> float:
        return self.asr[self.best]


def probe_parrots(engine: LossEngine, rows: Sequence[TrainRow], target_ids: Sequence[int],
                  measure: Callable[[torch.Tensor, int], float], *, seed: int, tries: int,
                  steps: int, lr: float, n_tokens: int, batch_size: int,
                  max_norm: float | None, splice: str = "random", progress: bool = False,
                  desc: str = "probe", stop_loss: float = 0.0) -> ProbeResult:
    """Trains ``tries`` fresh parrots on the frozen model (try k: seed ``seed + k``, for its
    initial rows, its batches and its splice positions) and measures each with
    ``measure(parrot, seed + k)``. Used by ``sande-fast probe`` and by the probe after every
    round of ``sanitize``."""
    (out,) = probe_parrots_many(engine, rows, [target_ids], [measure], seeds=[seed],
                                tries=tries, steps=steps, lr=lr, n_tokens=n_tokens,
                                batch_size=batch_size, max_norm=max_norm, splice=splice,
                                progress=progress, desc=desc, stop_loss=stop_loss)
    return out


def probe_parrots_many(engine: LossEngine, rows: Sequence[TrainRow],
                       target_id_lists: Sequence[Sequence[int]],
                       measures: Sequence[Callable[[torch.Tensor, int], float]], *,
                       seeds: Sequence[int], tries: int, steps: int, lr: float, n_tokens: int,
                       batch_size: int, max_norm: float | None, splice: str = "random",
                       progress: bool = False, desc: str = "probe",
                       stop_loss: float = 0.0) -> list[ProbeResult]:
    """:func:`probe_parrots` for several targets on one frozen model: target ``k`` gets what
    ``probe_parrots(..., target_id_lists[k], measures[k], seed=seeds[k])`` would give, while the
    targets' parrots of each try train together (:func:`~sande_fast.stages.simulate_many`)."""
    outs = [ProbeResult([], [], []) for _ in seeds]
    # Every try sees the same frozen model (measuring only generates), so the prompt keys and
    # values one try computed serve the next ones too.
    with engine.reuse_frozen_prefixes():
        for j in range(tries):
            label = f"{desc} {j + 1}/{tries}" if tries > 1 else desc
            runs = simulate_many(engine, rows, target_id_lists, steps=steps, lr=lr,
                                 n_tokens=n_tokens, batch_size=batch_size,
                                 seeds=[s + j for s in seeds], splice=splice,
                                 max_norm=max_norm, progress=progress, desc=label,
                                 stop_loss=stop_loss)
            for out, measure, seed, (parrot, curve) in zip(outs, measures, seeds, runs):
                out.asr.append(measure(parrot, seed + j))
                out.curves.append(curve)
                out.parrots.append(parrot)
    return outs


def probe(model: Any, tokenizer: Any, data: Any, target: str,
          config: ProbeConfig | None = None, *, progress: bool | None = None,
          **options: Any) -> dict[str, Any]:
    """Trains ``tries`` fresh parrots (seeds ``seed .. seed+tries-1``, random splice positions) on
    the frozen model and measures each one's attack success on the data prompts.

    Each parrot row is kept within ``parrot_max_norm`` times the largest token-embedding norm
    (0: unbounded): a trigger is made of tokens, and an unbounded soft prompt can steer even a
    clean model.

    Args:
        config: a :class:`~sande_fast.options.ProbeConfig`, or its fields as ``options``.
        progress: progress bars (default: on unless ``quiet``).

    Returns:
        ``{"probe_asr_max", "probe_asr_mean", "probe_asr": [per try], "final_loss": [per try],
        "steps", "tries", "target"}``. ``target`` may be a list (several backdoors): then
        ``{"targets": [one such dict per target], "probe_asr_max" (the worst target's),
        "probe_asr_mean" (the largest mean), "worst_target", "steps", "tries"}``.

    Raises:
        BadInputError: bad target, options or data.
    """
    cfg = config if config is not None else from_keywords(ProbeConfig, options)
    single = isinstance(target, str)
    if single and not target.strip():
        raise BadInputError("--target must be a non-empty text")
    targets = [target] if single else text_list(target, "--target")
    if not targets:
        raise BadInputError("--target must be a non-empty text")
    check_model_and_tokenizer(model, tokenizer)
    progress = (not cfg.quiet) if progress is None else progress
    rows = load_rows(data, cfg.prompt_key, cfg.response_key)
    model.to(resolve_device(cfg.device))
    window = SIMULATE_WINDOW
    fmt = resolve_prompt_format(cfg.prompt_format, bool(getattr(tokenizer, "chat_template", None)))
    encoder = PromptEncoder(tokenizer, fmt, max_prompt_tokens=prompt_budget(
        context_length(model), cfg.parrot_tokens, max(window, cfg.max_new_tokens)),
        system=cfg.system, extra_stop_ids=model_stop_ids(model))
    train = [TrainRow(r.prompt, encoder.encode_prompt(r.prompt, r.context), (), r.context)
             for r in rows]
    prompts = [t.prompt for t in train[:cfg.eval_rows]]
    id_lists = [encoder.encode_response(t, add_eos=False)[:window] for t in targets]
    if not all(id_lists):
        raise BadInputError("--target tokenises to nothing")
    engine = build_engine(model, max_batch=cfg.batch_size, pad_id=pad_token_id(tokenizer))
    # Every target gets the seeds it would get alone; their parrots train in one pass per step.
    results = probe_parrots_many(
        engine, train, id_lists, [parrot_measure(model, encoder, prompts, t, cfg)
                                  for t in targets],
        seeds=[cfg.seed] * len(targets), tries=cfg.tries, steps=cfg.steps, lr=cfg.lr,
        n_tokens=cfg.parrot_tokens, batch_size=cfg.batch_size,
        max_norm=cfg.parrot_max_norm or None, progress=progress)
    each = [{"probe_asr_max": r.asr_max, "probe_asr_mean": sum(r.asr) / len(r.asr),
             "probe_asr": r.asr, "final_loss": [c[-1] for c in r.curves],
             "steps": cfg.steps, "tries": cfg.tries, "target": t}
            for t, r in zip(targets, results)]
    if single:
        return each[0]
    worst = max(range(len(each)), key=lambda k: each[k]["probe_asr_max"])
    return {"probe_asr_max": each[worst]["probe_asr_max"],
            "probe_asr_mean": max(r["probe_asr_mean"] for r in each),
            "worst_target": targets[worst], "targets": each,
            "steps": cfg.steps, "tries": cfg.tries}


# The target tokens a probe parrot is trained on (stage 1's default window).
SIMULATE_WINDOW = 10


def parrot_measure(runner: Any, encoder: PromptEncoder, prompts: list[EncodedPrompt],
                   target: str, cfg: Any) -> Callable[[torch.Tensor, int], float]:
    """``measure(parrot, seed)``: the parrot's attack success on ``prompts`` (generation in
    batches of ``4 * batch_size``, at least 32)."""
    def measure(parrot: torch.Tensor, seed: int) -> float:
        return parrot_attack_success(runner, encoder, prompts, parrot, target, seed=seed,
                                     max_new_tokens=cfg.max_new_tokens,
                                     batch_size=max(32, cfg.batch_size * 4))
    return measure
