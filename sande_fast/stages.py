"""Stage loops: simulate (learn a parrot) and eliminate (overwrite the backdoor mapping).

Each loop draws a batch of rows per step, builds :class:`~sande_fast.steps.StepItem` s with fresh
random splice / trigger positions, and calls the public step objects. The loops own sampling,
progress bars and loss curves; the maths lives in :mod:`sande_fast.steps`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .data import EncodedPrompt, PromptEncoder, insert_trigger
from .batching import StepItem
from .engine import LossEngine
from .options import STOP_LOSS_WINDOW
from .steps import Anchors, OverwriteStep, ParrotSimulator

__all__ = ["TrainRow", "simulate", "simulate_many", "eliminate", "clean_anchors", "splice_position",
           "SPLICE_STRATEGIES"]

SPLICE_STRATEGIES = ("random", "start", "end")


@dataclass(frozen=True)
class TrainRow:
    """A defence row, tokenised: the clean prompt, its raw text, the clean response ids and the
    conversation turns before the text (:attr:`~sande_fast.data.Row.context`)."""

    text: str
    prompt: EncodedPrompt
    response: tuple[int, ...]
    context: tuple[tuple[str, str], ...] = ()


def splice_position(prompt: EncodedPrompt, strategy: str, rng: random.Random) -> int:
    """Where a parrot goes: a token boundary inside the user's text of the prompt."""
    lo, hi = prompt.span
    if strategy == "start":
        return lo
    if strategy == "end":
        return hi
    return rng.randint(lo, hi)


def _split(ids: Sequence[int], window: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(ids[:window]), tuple(ids[window:])


def _clean_item(row: TrainRow, window: int) -> StepItem:
    labels, tail = _split(row.response, window)
    return StepItem(tuple(row.prompt.ids), labels, -1, tail)


def clean_anchors(engine: LossEngine, rows: Sequence[TrainRow], window: int) -> Anchors:
    """The model's current final hidden states on every row's clean item (the retention
    targets of :func:`eliminate`); call it once, before the first training step."""
    return Anchors(engine, [_clean_item(r, window) for r in rows])


def simulate(engine: LossEngine, rows: Sequence[TrainRow], target_ids: Sequence[int], *,
             steps: int, lr: float, n_tokens: int, batch_size: int, seed: int,
             splice: str = "random", parrot: torch.Tensor | None = None,
             max_norm: float | None = 1.0, progress: bool = False,
             desc: str = "simulate", stop_loss: float = 0.0,
             stop_window: int = STOP_LOSS_WINDOW) -> tuple[torch.Tensor, list[float]]:
    """Stage 1: learns a parrot that makes the frozen model emit ``target_ids`` after each prompt.

    With ``stop_loss`` above 0 the run ends early, once the mean loss of its last
    ``stop_window`` steps is below it.

    The prompts' keys and values before the splices are kept across the run's steps
    (:meth:`~sande_fast.engine.LossEngine.reuse_frozen_prefixes`).

    Returns:
        The parrot ``[n_tokens, hidden]`` (fp32, detached) and the loss of every step.
    """
    (out,) = simulate_many(engine, rows, [target_ids], steps=steps, lr=lr, n_tokens=n_tokens,
                           batch_size=batch_size, seeds=[seed], splice=splice,
                           parrots=[parrot], max_norm=max_norm, progress=progress, desc=desc,
                           stop_loss=stop_loss, stop_window=stop_window)
    return out


def simulate_many(engine: LossEngine, rows: Sequence[TrainRow],
                  target_id_lists: Sequence[Sequence[int]], *, steps: int, lr: float,
                  n_tokens: int, batch_size: int, seeds: Sequence[int], splice: str = "random",
                  parrots: Sequence[torch.Tensor | None] | None = None,
                  max_norm: float | None = 1.0, progress: bool = False,
                  desc: str = "simulate", stop_loss: float = 0.0,
                  stop_window: int = STOP_LOSS_WINDOW) -> list[tuple[torch.Tensor, list[float]]]:
    """:func:`simulate` for several targets on one frozen model, in one pass per step.

    Target ``k`` runs exactly as ``simulate(..., target_id_lists[k], seed=seeds[k])`` would: its
    own initial rows, batches and splice positions, its own Adam state and early stop. Its
    steps share the micro-batches and the prompt-prefix work with the other targets'
    (:meth:`~sande_fast.steps.ParrotSimulator.step_together`); a target that stops leaves the
    pass and the others go on.

    Returns:
        Per target, its parrot ``[n_tokens, hidden]`` and the loss of every step it ran.
    """
    if len(seeds) != len(target_id_lists):
        raise ValueError(f"{len(target_id_lists)} targets and {len(seeds)} seeds")
    starts = list(parrots) if parrots is not None else [None] * len(seeds)
    rngs = [random.Random(seed) for seed in seeds]
    sims = [ParrotSimulator(engine, n_tokens=n_tokens, lr=lr, seed=seed, parrot=start,
                            max_norm=max_norm) for seed, start in zip(seeds, starts)]
    labels = [tuple(ids) for ids in target_id_lists]
    curves: list[list[float]] = [[] for _ in seeds]
    running = list(range(len(seeds)))
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=True)
    # The model stays frozen for the whole run, so the prompt keys and values before each
    # splice are computed once and kept across steps; the scope drops them at the end.
    with engine.reuse_frozen_prefixes():
        for step in bar:
            batches = []
            for k in running:
                rng = rngs[k]
                batch = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
                batches.append([StepItem(r.prompt.ids, labels[k],
                                         splice_position(r.prompt, splice, rng)) for r in batch])
            values = ParrotSimulator.step_together([sims[k] for k in running], batches,
                                                   where=f"{desc} step {step + 1}")
            for k, value in zip(running, values):
                curves[k].append(value)
            _show_loss(bar, max(values))
            running = [k for k in running
                       if not (stop_loss > 0 and len(curves[k]) >= stop_window
                               and sum(curves[k][-stop_window:]) / stop_window < stop_loss)]
            if not running:
                break
    bar.close()
    return [(sim.parrot.detach().clone(), curve) for sim, curve in zip(sims, curves)]


def eliminate(engine: LossEngine, rows: Sequence[TrainRow], *, steps: int, lr: float,
              batch_size: int, seed: int, window: int, clean_weight: float,
              parrot: torch.Tensor | Sequence[torch.Tensor] | None = None,
              trigger: str | Sequence[str] | None = None,
              encoder: PromptEncoder | None = None, trigger_position: str = "random",
              splice: str = "random", progress: bool = False, desc: str = "eliminate",
              retain_weight: float = 0.0,
              anchors: Anchors | None = None, optimizer: str = "adamw",
              unlikely: Sequence[Sequence[int]] | None = None,
              unlikely_weight: float = 0.0) -> list[float]:
    """Stage 2 / OSFT / SFT: trains the model on (prompt + parrot or trigger) -> clean response.

    With a ``parrot``: overwrite items splice it at a fresh position each step. With a ``trigger``
    (OSFT): the trigger text is inserted into the prompt at ``trigger_position``. With a list
    of parrots or triggers (several backdoors), every row of a batch gets one overwrite item
    per backdoor, each at its own position, and the overwrite term sums the backdoors' means:
    every mapping is overwritten as hard as a single one would be, in one pass over the rows
    (taking the backdoors in turn, a row each, left the toy's three mappings half found by the
    probe after a round). With neither
    (SFT baseline): only the clean term is trained, at weight 1. ``retain_weight`` and
    ``anchors`` (from :func:`clean_anchors`, taken before any training) add the hidden-state
    retention term of :class:`~sande_fast.steps.OverwriteStep`; ``optimizer`` is its
    optimizer (``adamw`` or ``sgd``). With ``unlikely`` (the target's token ids, one list per
    parrot or trigger) and ``unlikely_weight`` above 0, every overwrite item gets a twin with
    the same prompt and splice followed by its target, trained by the unlikelihood term.

    Returns:
        The loss of every step.
    """
    if parrot is not None and trigger is not None:
        raise ValueError("give a parrot or a trigger, not both")
    if trigger is not None and encoder is None:
        raise ValueError("a trigger needs the prompt encoder")
    rng = random.Random(seed)
    sft = parrot is None and trigger is None
    parrots = [parrot] if isinstance(parrot, torch.Tensor) else list(parrot or [])
    triggers = [trigger] if isinstance(trigger, str) else list(trigger or [])
    if (parrot is not None and not parrots) or (trigger is not None and not triggers):
        raise ValueError("an empty list of parrots or triggers")
    n_backdoors = max(len(parrots), len(triggers), 1)
    if unlikely_weight and not sft:
        if unlikely is None or len(unlikely) != n_backdoors or not all(unlikely):
            raise ValueError(f"unlikely_weight needs one non-empty target per backdoor "
                             f"({n_backdoors})")
        targets = [tuple(ids) for ids in unlikely]
    else:
        targets = []
    step_fn = OverwriteStep(engine, lr=lr, clean_weight=1.0 if sft else clean_weight,
                            parrot=parrots or None, retain_weight=retain_weight,
                            anchors=anchors, optimizer=optimizer,
                            unlikely_weight=unlikely_weight if targets else 0.0)
    curve = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=True)
    for step in bar:
        batch = [rows[rng.randrange(len(rows))] for _ in range(batch_size)]
        clean, overwrite, which = [], [], []
        for r in batch:
            clean.append(_clean_item(r, window))
            labels, tail = clean[-1].labels, clean[-1].tail
            for k in range(len(parrots)):
                overwrite.append(StepItem(r.prompt.ids, labels,
                                          splice_position(r.prompt, splice, rng), tail))
                which.append(k)
            for k, trigger_k in enumerate(triggers):
                p = encoder.encode_prompt(insert_trigger(r.text, trigger_k, trigger_position,
                                                         rng), r.context)
                overwrite.append(StepItem(p.ids, labels, -1, tail))
                which.append(k)
        # The twins: the same prompts and splices, followed by their backdoor's target.
        twins = [replace(it, labels=targets[k], tail=())
                 for it, k in zip(overwrite, which)] if targets else []
        curve.append(step_fn.step(overwrite, clean, where=f"{desc} step {step + 1}",
                                  parrot_index=which if len(parrots) > 1 else None,
                                  backdoors=n_backdoors, unlikely=twins,
                                  unlikely_index=which if twins and len(parrots) > 1 else None))
        _show_loss(bar, curve[-1])
    bar.close()
    return curve


def _show_loss(bar: tqdm, loss: float) -> None:
    """The step's loss beside the bar's rate; drawn at the bar's next refresh (a forced redraw
    each step would cost more than a small model's step)."""
    if not bar.disable:
        bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
