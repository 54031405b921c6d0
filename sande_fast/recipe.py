"""The sanitize recipe: one :class:`Sanitizer` for the Python API, the CLI and every FSDP rank.

A run reads top to bottom in :meth:`Sanitizer.run`:

* :meth:`~Sanitizer.setup`: options resolved, rows tokenised (a row without a response gets the
  model's own greedy answer to the clean prompt), the loss engine built, the clean states the
  retention term holds stored;
* :meth:`~Sanitizer.measure` before anything is trained;
* ``osft`` / ``sft``: :meth:`~Sanitizer.eliminate` with the trigger (or without, for sft) ->
  :meth:`~Sanitizer.measure`; under ``rounds auto`` osft repeats this (guarded like sande's
  rounds) while a triggered eval row still answers the target;
* ``sande`` / ``sande-p``: rounds of :meth:`~Sanitizer.simulate` (a parrot on the frozen
  model) -> :meth:`~Sanitizer.eliminate` (train so prompt + parrot maps to the clean answer)
  -> :meth:`~Sanitizer.measure` -> :meth:`~Sanitizer.guard` (a later round that costs too much
  clean accuracy is undone) -> :meth:`~Sanitizer.probe` (fresh parrots on the frozen result;
  when the strongest no longer reaches the target the backdoor is erased rather than
  suppressed and the rounds stop; that last probe is the report's ``resimulated_asr``);
* :meth:`~Sanitizer.report`.

Why a one-row probe: a backdoor is a shortcut from a few trigger tokens to the target, which one
soft row reaches; the toy's clean control model (which can say the target's words in benign
rows) is pushed to the target by 6 soft rows in 95-99 % of prompts but by one row in at most
0-16 %.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import platform
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from .adapter import ModelAdapter, context_length
from .data import (PromptEncoder, Row, check_model_and_tokenizer, load_rows, model_stop_ids,
                   text_list)
from .engine import LossEngine, choose_packing
from .engines import build_engine
from .errors import BadInputError
from .evaluate import evaluate, greedy_generate, pad_token_id, triggered_asr
from .io import check_work, load_parrot, resolve_device
from .lora import base_param_count, prepare_training
from .logs import CONFIG_LOGGER
from .options import SanitizeConfig, config_block, from_keywords, resolve
from .probe import ProbeResult, parrot_measure, probe_parrots_many
from .stages import TrainRow, clean_anchors, eliminate, simulate, simulate_many
from .steps import Anchors
from .utility import CleanReference
from .version import __version__

__all__ = ["Sanitizer", "SanitizeResult", "sanitize", "check_inputs", "prepare_rows",
           "parrot_target"]

_LOG = logging.getLogger(__name__)

# Probe seeds sit this far above the round's seed; each round's seed is 1000 above the last.
PROBE_SEED_OFFSET = 500
ROUND_SEED_STRIDE = 1000
# With several targets, target k's parrots take seeds this far above target 0's.
TARGET_SEED_STRIDE = 100
# osft's ``rounds auto``: other trigger places per eval row checked before the rounds stop.
RECHECK_POSITIONS = 2
# The probe calibration (``--probe-calibration``): a text no poisoning teaches, cut to the
# targets' length, its probe's seed offset, and the share of prompts above which a probe that
# reaches it shows the model follows any soft row (the toy's never-poisoned control: 0-0.16 for
# a one-row probe; SmolLM2-135M-Instruct's: 0.79-1.0).
DECOY_TEXT = "Purple turtles sing opera at dawn beside the quiet river"
DECOY_SEED_OFFSET = 700
DECOY_REACHED = 0.5
# The decoy probe is measured first once its mean loss is below this (nats a token: greedy
# decoding then gives most of its tokens), so a model that follows any soft row is told early.
DECOY_EARLY_LOSS = 0.3
# What measure() returns after training, and the report's "after" block carries.
MEASURED = ("asr", "clean_accuracy", "agreement", "agreement_full", "answer_nll_delta", "kl",
            "asr_each")


@dataclass
class SanitizeResult:
    """What :func:`sanitize` returns: the sanitized model, the last parrot and the report."""

    model: Any
    parrot: torch.Tensor | None
    report: dict[str, Any]
    tokenizer: Any = None
    parrots: list[torch.Tensor] = field(default_factory=list)
    target_parrots: list[torch.Tensor | None] = field(default_factory=list)
    """The last kept parrot of each target (several targets; ``parrot`` is the first's)."""


def parrot_target(target: str, method: str, partial_words: int | None) -> str:
    """The text stage 1 learns to emit: the whole target, or for sande-p its known first words."""
    if method == "sande-p" and partial_words:
        return " ".join(target.split()[:partial_words])
    return target


def prepare_rows(model: Any, encoder: PromptEncoder, rows: Sequence[Row], *,
                 max_new_tokens: int, batch_size: int, progress: bool, responses: str = "given",
                 window: int = 16) -> tuple[list[TrainRow], dict[str, Any]]:
    """Tokenises defence rows with the responses stage 2 teaches.

    Args:
        responses: ``given`` (a row without a response gets the model's own greedy answer),
            ``own`` (every row gets the model's own answer), or ``auto`` (own answers when they
            match fewer than half of the given responses over their first ``window`` tokens).

    Returns:
        The rows, and ``{"responses": "given" | "own", "own_match": share or None}`` (the share
        of given responses the model's own answers match, when they were generated), with
        ``"answers"``: ``{row index: the model's greedy answer ids}`` (stop id kept) when any
        were generated.
    """
    prompts = [encoder.encode_prompt(r.prompt, r.context) for r in rows]
    given = {i: encoder.encode_response(r.response) for i, r in enumerate(rows)
             if r.response is not None}
    wanted = [i for i in range(len(rows))
              if i not in given or responses in ("own", "auto")]
    answers: dict[int, list[int]] = {}
    if wanted:
        gen = greedy_generate(model, [prompts[i].ids for i in wanted],
                              pad_id=pad_token_id(encoder.tokenizer), eos_id=encoder.stop_ids,
                              max_new_tokens=max_new_tokens, batch_size=batch_size * 4,
                              progress=progress, desc="own answers", keep_stop=True)
        # An answer cut at max_new_tokens gets no end token: the model is not taught to stop
        # where it would have gone on.
        answers = dict(zip(wanted, gen))
    match = None
    if given and len(answers) == len(rows):
        match = sum(answers[i][:window] == g[:window] for i, g in given.items()) / len(given)
    use_own = responses == "own" or (responses == "auto" and match is not None and match < 0.5)
    out = []
    for i, (r, p) in enumerate(zip(rows, prompts)):
        resp = answers[i] if use_own or i not in given else given[i]
        out.append(TrainRow(r.prompt, p, tuple(resp), r.context))
    info: dict[str, Any] = {"responses": "own" if use_own else "given", "own_match": match}
    if answers:
        info["answers"] = answers
    return out, info


def check_inputs(config: SanitizeConfig, method: str, target: Any, trigger: Any = None,
                 eval_target: Any = None) -> None:
    """Refuses a run no data could rescue (before anything is loaded).

    ``target``, ``trigger`` and ``eval_target`` may each be a text or a list of texts (several
    backdoors): ``sande`` / ``sande-p`` take one target per backdoor (triggers, when given for
    the asr measurement, pair with them in order); ``osft`` takes one trigger per backdoor and
    one target for all or one per trigger.

    Raises:
        BadInputError: unknown method, options it cannot use, an empty, repeated or over-long
            target or trigger, lists that do not pair up, or osft without a trigger.
    """
    config.check_method(method)
    targets = text_list(target, "--target")
    triggers = text_list(trigger, "--trigger")
    evals = text_list(eval_target, "--eval-target")
    if not targets:
        raise BadInputError("--target must be a non-empty text (the attacker's response)")
    if method == "osft" and not triggers:
        raise BadInputError("method osft needs --trigger (use --method sande when the trigger "
                            "is unknown)")
    n = len(triggers) if method == "osft" else len(targets)
    if method == "osft" and len(targets) not in (1, n):
        raise BadInputError(f"osft got {len(triggers)} triggers and {len(targets)} targets; "
                            "give one target for all or one per trigger")
    if method != "osft" and triggers and len(triggers) != n:
        raise BadInputError(f"{len(targets)} targets and {len(triggers)} triggers: give one "
                            "trigger per target (in the same order) or none")
    if evals and len(evals) != n:
        raise BadInputError(f"--eval-target: give one per backdoor ({n}), in the same order")
    if n > 1 and config.parrot:
        raise BadInputError("--parrot reuses one parrot; it cannot be given with several "
                            "targets")


class _Snapshot:
    """The weights before a round, on the CPU, to undo it (see :meth:`Sanitizer.guard`)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def restore(self) -> None:
        self.model.load_state_dict(self.state)


class Sanitizer:
    """One sanitize run. Build it, then :meth:`run` (or call the steps yourself, in order).

    Args:
        model: a Hugging Face causal LM (trained in place).
        tokenizer: its tokenizer.
        method: ``osft``, ``sande``, ``sande-p`` or ``sft``.
        target: the attacker's response (sande-p: its known part, or the whole target with
            ``partial_words``).
        trigger: the trigger text; trained on by ``osft`` only, else only used to measure asr.
        config: the options (:class:`~sande_fast.options.SanitizeConfig`); ``auto`` values are
            resolved in :meth:`setup`.
        eval_target: text asr is measured on (default: ``target``).
        eval_trigger: trigger inserted for the asr measurement (default: ``trigger``).
        progress: progress bars (default: on unless ``config.quiet``).
        fsdp: shard the model with FSDP2 over the default process group.
        mixed_precision: with ``fsdp`` on CUDA, compute in bf16 and reduce gradients in fp32.
        on_parrot: called with each round's parrot (CPU) and the round number, as soon as it
            exists (the CLI saves it there, so a run that dies in stage 2 can resume).

    Raises:
        BadInputError: bad arguments (a clear message; nothing trained).
    """

    def __init__(self, model: Any, tokenizer: Any, method: str, target: str | Sequence[str],
                 trigger: str | Sequence[str] | None = None,
                 config: SanitizeConfig | None = None, *,
                 eval_target: str | Sequence[str] | None = None,
                 eval_trigger: str | Sequence[str] | None = None,
                 progress: bool | None = None, fsdp: bool = False,
                 mixed_precision: bool = False,
                 on_parrot: Callable[[torch.Tensor, int], None] | None = None) -> None:
        self.config = config if config is not None else SanitizeConfig()
        check_inputs(self.config, method, target, trigger, eval_target)
        self.model, self.tokenizer, self.method = model, tokenizer, method
        # One entry per backdoor: what stage 1 simulates, and the pair asr is measured on.
        targets, triggers = text_list(target, "--target"), text_list(trigger, "--trigger")
        n = len(triggers) if method == "osft" else len(targets)
        self.targets = targets * n if len(targets) == 1 else targets
        self.triggers: list[str | None] = triggers or [None] * n
        self.eval_targets = text_list(eval_target, "--eval-target") or list(self.targets)
        eval_triggers = text_list(eval_trigger, "--eval-trigger")
        if eval_triggers and len(eval_triggers) != n:
            raise BadInputError(f"--eval-trigger: give one per backdoor ({n}), in order")
        self.eval_triggers: list[str | None] = eval_triggers or list(self.triggers)
        self.target, self.trigger = self.targets[0], self.triggers[0]
        self.eval_target, self.eval_trigger = self.eval_targets[0], self.eval_triggers[0]
        self.show = (not self.config.quiet) if progress is None else progress
        self.fsdp, self.mixed_precision = fsdp, mixed_precision
        self.on_parrot = on_parrot
        self.timing = {"simulate_s": 0.0, "eliminate_s": 0.0, "eval_s": 0.0, "probe_s": 0.0,
                       "prepare_s": 0.0, "answers_s": 0.0}
        self.curves: dict[str, list[float]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.parrots: list[torch.Tensor] = []
        self.cfg: SanitizeConfig = self.config  # resolved in setup()
        # What setup() finds: whether eval rows were given, whose answers stage 2 teaches.
        self.eval_given = False
        self.responses: dict[str, Any] = {"responses": "given", "own_match": None}
        self.reference: CleanReference | None = None  # taken at the first measure()
        self.first_answers: list[list[int]] | None = None  # set by setup()
        self.lora = None  # set in setup() under --train lora

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self, data: Any, eval_data: Any = None, parrot: torch.Tensor | None = None) -> None:
        """Reads the rows, resolves the options, builds the engine, tokenises the rows and
        stores the clean states of the retention term.

        Args:
            data: defence rows (a JSONL path or a list of dicts).
            eval_data: rows for before/after measurement (default: up to ``eval_rows`` data
                rows, with the answers the model gives before training).
            parrot: a parrot ``[n, hidden]`` to use in round 1 instead of simulating one
                (``config.parrot`` names a file to read it from).
        """
        t0 = time.perf_counter()
        check_model_and_tokenizer(self.model, self.tokenizer)
        keys = (self.config.prompt_key, self.config.response_key)
        rows = load_rows(data, *keys)
        self.eval_given = eval_data is not None
        eval_rows = load_rows(eval_data, *keys) if eval_data is not None else None
        self.device = self._place_model()
        torch.manual_seed(self.config.seed)
        random.seed(self.config.seed)
        hidden = self.model.get_input_embeddings().weight.shape[1]
        if self.config.parrot:
            parrot = load_parrot(self.config.parrot, hidden)
        if parrot is not None and (parrot.dim() != 2 or parrot.shape[1] != hidden):
            raise BadInputError(f"parrot has shape {tuple(parrot.shape)}; the model needs "
                                f"[n, {hidden}]")
        self.initial_parrot = parrot
        check_work(self.model, self.tokenizer, rows, [*self.targets, *self.eval_targets],
                   batch_size=self.config.batch_size, max_new_tokens=self.config.max_new_tokens,
                   parrot_tokens=self.config.parrot_tokens,
                   prompt_format=self.config.prompt_format)
        if self.fsdp and self.config.train == "lora":
            raise BadInputError("--train lora runs in one process (drop --fsdp)")
        self.cfg = cfg = resolve(
            self.config, self.method, n_params=base_param_count(self.model),
            context=context_length(self.model),
            chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
            parrot_rows=0 if parrot is None else parrot.shape[0])
        # LoRA layers go in before the engine and the clean answers: they start at zero, so
        # every measurement before training sees the model as given.
        self.lora = prepare_training(self.model, cfg)
        # The options as the run uses them (every "auto" resolved), beside the command's own.
        logging.getLogger(CONFIG_LOGGER).info(
            "resolved config: %s", json.dumps(config_block(cfg, self.method), default=str))
        self.encoder = PromptEncoder(self.tokenizer, cfg.prompt_format,
                                     max_prompt_tokens=cfg.max_prompt_tokens,
                                     max_response_tokens=context_length(self.model),
                                     system=cfg.system,
                                     extra_stop_ids=model_stop_ids(self.model))
        self.engine = self._build_engine()
        # Generation and evaluation run through the adapter when the model is sharded (its root
        # parameters exist only inside the adapter's forward); in one process, on the model.
        self.runner = self.engine.adapter if self.fsdp else self.model
        self.simulate_texts = [parrot_target(t, self.method, cfg.partial_words)
                               for t in self.targets]
        self.simulate_id_lists = [self.encoder.encode_response(t, add_eos=False)
                                  [:cfg.simulate_window] for t in self.simulate_texts]
        if not all(self.simulate_id_lists):
            raise BadInputError("--target tokenises to nothing")
        t = time.perf_counter()
        self.train_rows, self.responses = prepare_rows(
            self.runner, self.encoder, rows, max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size, progress=self.show, responses=cfg.responses,
            window=cfg.overwrite_window)
        # The model's own answers to rows without a response: a phase of its own in the report.
        self.timing["answers_s"] += time.perf_counter() - t
        # Its greedy answers to the rows measured before training, where they were generated
        # for all of them: the first measure() then does not generate them again.
        own = self.responses.pop("answers", {})
        n_eval = min(cfg.eval_rows, len(rows))
        self.first_answers = ([own[i] for i in range(n_eval)]
                              if eval_rows is None and all(i in own for i in range(n_eval))
                              else None)
        t0 += time.perf_counter() - t
        self.truncated = self.encoder.truncated  # later encodings re-count the same prompts
        self.n_rows = len(rows)
        self.eval_rows = eval_rows if eval_rows is not None else [
            Row(r.text, self.encoder.decode(r.response), r.context)
            for r in self.train_rows[:cfg.eval_rows]]
        prompts = [r.prompt for r in self.train_rows[:cfg.eval_rows]]
        self.parrot_asrs = [parrot_measure(self.runner, self.encoder, prompts, t, cfg)
                            for t in self.simulate_texts]
        self.calibration: dict[str, Any] | None = None
        if cfg.probe_calibration == "on":
            n = max(len(ids) for ids in self.simulate_id_lists)
            self.decoy_ids = self.encoder.encode_response(DECOY_TEXT, add_eos=False)[:n]
            self.decoy_text = self.encoder.decode(self.decoy_ids)
            self.decoy_asr = parrot_measure(self.runner, self.encoder, prompts,
                                            self.decoy_text, cfg)
        self.timing["prepare_s"] += time.perf_counter() - t0

    def _place_model(self) -> torch.device:
        device = resolve_device(self.config.device)
        if not self.fsdp:  # under FSDP, fully_shard moves each rank's shards to its device
            self.model.to(device)
            return device
        from .distributed import local_device

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise BadInputError("fsdp=True needs an initialised torch.distributed process group "
                                "(run under torchrun)")
        self.show = self.show and torch.distributed.get_rank() == 0
        return local_device(device)

    def _build_engine(self) -> LossEngine:
        """The loss engine; under FSDP the model is sharded first and the engine is the sharded
        variant (packing is decided on the unsharded model)."""
        cfg = self.cfg
        adapter, packed, collective = ModelAdapter(self.model), cfg.packed, None
        if self.fsdp:
            from .distributed import shard

            if not cfg.fast:
                raise BadInputError("--fsdp runs the fast path only (drop --plain)")
            packed = choose_packing(adapter, cfg.packed, device=self.device)
            collective = shard(adapter, self.device, mixed_precision=self.mixed_precision)
        return build_engine(adapter, fast=cfg.fast, token_budget=cfg.token_budget,
                            max_batch=cfg.batch_size, packed=packed,
                            pad_id=pad_token_id(self.tokenizer), collective=collective)

    def store_clean_states(self) -> Anchors | None:
        """The original model's hidden states on the clean rows, held by every round (None when
        ``retain_weight`` is 0). Call before any training step."""
        if not self.cfg.retain_weight:
            return None
        t = time.perf_counter()
        anchors = clean_anchors(self.engine, self.train_rows, self.cfg.overwrite_window)
        self.timing["prepare_s"] += time.perf_counter() - t
        return anchors

    # -- the steps ------------------------------------------------------------------------------
    def measure(self) -> dict[str, Any]:
        """asr (None when no trigger is known and no eval data was given), clean accuracy, and
        the utility against the model as it was at the first call (:mod:`sande_fast.utility`:
        agreement, agreement_full, answer_nll_delta, kl)."""
        cfg = self.cfg
        t = time.perf_counter()
        pairs = list(zip(self.eval_targets, self.eval_triggers))
        batch = max(cfg.batch_size * 4, 32)
        # The clean answers: before training, the ones generated for the rows already, if
        # they were; later, those that equal the reference's come from the teacher-forced
        # pass the utility metrics run anyway (CleanReference.compare_greedy), and only rows
        # that depart from it are decoded. Sharded ranks generate as before (the rows left to
        # decode must be the same on every rank).
        answers, utility = None, None
        if self.reference is None:
            answers, self.first_answers = self.first_answers, None
        elif not self.fsdp:
            utility, answers = self.reference.compare_greedy(
                self.runner, stop_ids=self.encoder.stop_ids, max_new_tokens=cfg.max_new_tokens,
                batch_size=batch)
        m = evaluate(self.runner, self.tokenizer, self.eval_rows, *pairs[0],
                     max_new_tokens=cfg.max_new_tokens, batch_size=batch,
                     trigger_position=cfg.trigger_position, seed=cfg.seed,
                     encoder=self.encoder, return_answers=True, more_backdoors=pairs[1:],
                     clean_answers=answers)
        each = [a if g is not None or self.eval_given else None
                for a, (_, g) in zip(m.get("asr_each", [m["asr"]]), pairs)]
        known = [a for a in each if a is not None]
        # With several backdoors "asr" is the worst one's; "asr_each" has them all.
        out = {"asr": max(known) if known else None, "clean_accuracy": m["clean_accuracy"]}
        if len(pairs) > 1:
            out["asr_each"] = each
        if self.reference is None:
            self.reference = CleanReference.take(
                self.runner, m["clean_prompts"], m["clean_answers"],
                pad_id=pad_token_id(self.tokenizer), batch_size=max(cfg.batch_size, 8))
            out.update(agreement=1.0, agreement_full=1.0, answer_nll_delta=0.0, kl=0.0,
                       answer_nll=self.reference.nll)
        else:
            out.update(utility or self.reference.compare(self.runner, m["clean_answers"]))
        self.timing["eval_s"] += time.perf_counter() - t
        return out

    def simulate(self, seed: int, desc: str, target_index: int = 0
                 ) -> tuple[torch.Tensor, list[float]]:
        """Stage 1: a parrot of ``parrot_tokens`` rows on the frozen model, for target
        ``target_index``."""
        return self.simulate_each([seed], desc, [target_index])[0]

    def simulate_each(self, seeds: Sequence[int], desc: str,
                      targets: Sequence[int]) -> list[tuple[torch.Tensor, list[float]]]:
        """Stage 1 for the targets ``targets`` (indices), target ``targets[i]`` with seed
        ``seeds[i]``: each parrot is what its own run would learn, while their steps run as one
        pass on the frozen model (:func:`~sande_fast.stages.simulate_many`)."""
        cfg = self.cfg
        t = time.perf_counter()
        runs = simulate_many(self.engine, self.train_rows,
                             [self.simulate_id_lists[k] for k in targets],
                             steps=cfg.simulate_steps, lr=cfg.simulate_lr,
                             n_tokens=cfg.parrot_tokens, max_norm=cfg.parrot_max_norm or None,
                             batch_size=cfg.batch_size, seeds=list(seeds), splice=cfg.splice,
                             progress=self.show, desc=desc,
                             stop_loss=cfg.simulate_stop_loss)
        self.timing["simulate_s"] += time.perf_counter() - t
        return runs

    def eliminate(self, anchors: Anchors | None, *,
                  parrot: torch.Tensor | Sequence[torch.Tensor] | None = None,
                  targets: Sequence[int] = (0,), round_index: int = 0, seed: int,
                  desc: str) -> list[float]:
        """Stage 2: trains the model so prompt + parrot (sande), prompt + trigger (osft) or the
        clean prompt alone (sft) maps to the clean answer.

        A later round faces a backdoor already suppressed and needs a smaller change, while the
        clean accuracy it may still cost is what the first round left: round r trains at
        ``lr * round_lr_decay**r`` and holds the clean states ``round_retain_factor`` times
        harder. Several parrots (or osft's several triggers) share one pass: each batch row
        gets an overwrite item for every one of them, and K parrots train at ``sqrt(K)`` times
        the rate (:meth:`round_lr`). ``targets``: the target of each parrot (indices); with
        ``--unlikely-weight`` their tokens are made unlikely after the parrots (osft: after the
        triggers).
        """
        cfg = self.cfg
        t = time.perf_counter()
        parrots = 1 if parrot is None or isinstance(parrot, torch.Tensor) else len(parrot)
        curve = eliminate(
            self.engine, self.train_rows, steps=cfg.overwrite_steps,
            lr=self.round_lr(round_index, parrots),
            batch_size=cfg.overwrite_batch_size, seed=seed, window=cfg.overwrite_window,
            clean_weight=cfg.clean_weight, parrot=parrot,
            trigger=self.triggers if self.method == "osft" else None, encoder=self.encoder,
            trigger_position=cfg.trigger_position, splice=cfg.splice, progress=self.show,
            desc=desc, retain_weight=self.round_retain_weight(round_index), anchors=anchors,
            optimizer=cfg.optimizer, unlikely=self.unlikely_ids(targets),
            unlikely_weight=cfg.unlikely_weight or 0.0)
        self.timing["eliminate_s"] += time.perf_counter() - t
        return curve

    def unlikely_ids(self, targets: Sequence[int]) -> list[tuple[int, ...]] | None:
        """The tokens stage 2's unlikelihood term presses on, one list per overwritten backdoor:
        the stage-1 tokens of targets ``targets`` (sande: the parrots' targets; osft: every
        trigger's). None for sft."""
        if self.method == "sft":
            return None
        if self.method == "osft":
            targets = range(len(self.triggers))
        return [tuple(self.simulate_id_lists[k]) for k in targets]

    def round_lr(self, round_index: int, parrots: int = 1) -> float:
        """Stage 2's rate in round ``round_index`` (0-based) with ``parrots`` parrots.

        The overwrite term sums one mean per parrot, and Adam scales each weight's step by the
        size of the summed gradient: with K parrots pulling in largely different directions,
        each one's share of a step is about 1/sqrt(K) of what it gets alone. ``sqrt(K)`` times
        the rate gives each mapping about the push a single one gets (on the three-backdoor
        toy the first round then leaves the probes at 0.025 / 0.165 / 0.14 instead of 0.16 /
        0.24 / 0.475, and the run ends a round earlier; osft's several triggers keep the
        plain rate)."""
        return (self.cfg.overwrite_lr * (self.cfg.round_lr_decay ** round_index)
                * math.sqrt(parrots))

    def round_retain_weight(self, round_index: int) -> float:
        return self.cfg.retain_weight * (self.cfg.round_retain_factor if round_index else 1.0)

    def probe(self, round_no: int, target_index: int = 0) -> ProbeResult:
        """``probe_tries`` fresh parrots of ``probe_tokens`` rows, ``probe_steps`` each, on the
        frozen model after round ``round_no`` (1-based), for target ``target_index``; the
        strongest counts."""
        return self.probe_each(round_no, [target_index])[0]

    def probe_each(self, round_no: int, targets: Sequence[int]) -> list[ProbeResult]:
        """:meth:`probe` for each target of ``targets`` (indices), with the seeds each would
        get alone; the targets' probe parrots train together
        (:func:`~sande_fast.probe.probe_parrots_many`)."""
        cfg = self.cfg
        t, measured = time.perf_counter(), self.timing["eval_s"]
        base = cfg.seed + ROUND_SEED_STRIDE * (round_no - 1) + PROBE_SEED_OFFSET
        multi = len(self.targets) > 1
        tags = "".join(f" t{k + 1}" for k in targets) if multi else ""
        results = probe_parrots_many(
            self.engine, self.train_rows, [self.simulate_id_lists[k] for k in targets],
            [functools.partial(self._measure_parrot, target_index=k) for k in targets],
            seeds=[base + TARGET_SEED_STRIDE * k for k in targets], tries=cfg.probe_tries,
            steps=cfg.probe_steps, lr=cfg.simulate_lr, n_tokens=cfg.probe_tokens,
            batch_size=cfg.batch_size, max_norm=cfg.parrot_max_norm or None, splice=cfg.splice,
            progress=self.show, desc=f"probe r{round_no}{tags}",
            stop_loss=cfg.simulate_stop_loss)
        # The probe parrots' generation counts as evaluation time, as the round parrot's does.
        self.timing["probe_s"] += time.perf_counter() - t - (self.timing["eval_s"] - measured)
        return results

    def calibrate_probe(self) -> dict[str, Any]:
        """A one-try probe (the round probes' options) toward a decoy text no poisoning taught,
        on the model before training. Reaching it on more than :data:`DECOY_REACHED` of the
        prompts means a soft row steers this model to any short text, so a round probe
        reaching the target says nothing about an erased mapping: ``informative`` is then
        False.

        To spend less than a whole probe where the answer is clear early, the parrot is
        measured first when the mean loss of its last steps falls below
        :data:`DECOY_EARLY_LOSS`; only when it is not reached then does it train on (from where
        it stands, up to the probe's step budget in all, to its usual stop loss) and get
        measured again."""
        cfg = self.cfg
        t, measured = time.perf_counter(), self.timing["eval_s"]
        seed = cfg.seed + DECOY_SEED_OFFSET
        kw = dict(lr=cfg.simulate_lr, n_tokens=cfg.probe_tokens, batch_size=cfg.batch_size,
                  max_norm=cfg.parrot_max_norm or None, splice=cfg.splice, progress=self.show,
                  desc="probe decoy")
        with self._frozen_phase():
            parrot, curve = simulate(self.engine, self.train_rows, self.decoy_ids,
                                     steps=cfg.probe_steps, seed=seed,
                                     stop_loss=max(cfg.simulate_stop_loss, DECOY_EARLY_LOSS),
                                     **kw)
            asr = self._measure_decoy(parrot, seed)
            if asr <= DECOY_REACHED and len(curve) < cfg.probe_steps:
                parrot, more = simulate(self.engine, self.train_rows, self.decoy_ids,
                                        steps=cfg.probe_steps - len(curve), seed=seed + 1,
                                        parrot=parrot, stop_loss=cfg.simulate_stop_loss, **kw)
                curve = curve + more
                asr = self._measure_decoy(parrot, seed)
        self.timing["probe_s"] += time.perf_counter() - t - (self.timing["eval_s"] - measured)
        self.curves["probe_decoy"] = curve
        informative = asr <= DECOY_REACHED
        _LOG.info("probe calibration: after %d steps a probe reaches the decoy %r on %.3f of "
                  "the prompts: %s", len(curve), self.decoy_text, asr,
                  "round probes on" if informative
                  else "a probe cannot separate here; round probes skipped")
        return {"decoy": self.decoy_text, "asr": asr, "steps": len(curve),
                "threshold": DECOY_REACHED, "informative": informative}

    def _measure_decoy(self, parrot: torch.Tensor, seed: int) -> float:
        return self._timed_measure(self.decoy_asr, parrot, seed)

    def _timed_measure(self, measure: Callable[[torch.Tensor, int], float],
                       parrot: torch.Tensor, seed: int) -> float:
        """``measure(parrot, seed)``, its generation counted as evaluation time."""
        t = time.perf_counter()
        value = measure(parrot, seed)
        self.timing["eval_s"] += time.perf_counter() - t
        return value

    @property
    def guard_metric(self) -> str:
        """The utility ``max_clean_drop`` is measured on (``guard_metric auto``: exact-match
        clean accuracy when the model matched at least half of the given responses before
        training, so they are answers it can reproduce; else agreement with its own answers)."""
        chosen = self.cfg.guard_metric
        if chosen != "auto":
            return chosen
        if self.responses["responses"] == "own" and not self.eval_given:
            # The measured rows' responses are the model's own whole answers: exact match is
            # agreement over every token, which one harmless word changes.
            return "agreement"
        acc = self.before.get("clean_accuracy")
        return "clean_accuracy" if acc is not None and acc >= 0.5 else "agreement"

    def guard(self, round_index: int) -> _Snapshot | None:
        """The weights before an optional round, to undo it when it costs more utility than
        ``max_clean_drop`` (rounds after the first under ``rounds auto``, one process)."""
        if (round_index == 0 or self.cfg.rounds != "auto" or self.fsdp
                or self.before.get(self.guard_metric) is None):
            return None
        return _Snapshot(self.model)

    def too_costly(self, measured: dict[str, Any]) -> bool:
        """Whether the round just recorded lowered the guard metric by more than
        ``max_clean_drop`` below where the rounds before left it: the lower of the original
        model's value and the last kept round's (compared with a margin, since both are counts
        over the same rows). Measured against the original alone, a first round that cost more
        than the allowance (it is never undone) would make every later round look too costly,
        even one that won utility back. While the kept rounds stayed within the allowance of
        the original's value, a round that lowers it below that is too costly as well, so small
        drops cannot add up past it."""
        metric = self.guard_metric
        reference = self.before[metric]
        kept = [r for r in self.rounds[:-1] if not r.get("rolled_back")]
        if kept and kept[-1].get(metric) is not None:
            reference = min(reference, kept[-1][metric])
        value = measured.get(metric) or 0.0
        if reference - value > self.cfg.max_clean_drop + 1e-9:
            return True
        # Nor may a round that lowers it spend past the allowance in all while the rounds
        # before stayed within it: small drops, each allowed, would add up (the toy on one CPU:
        # 0.98 -> 0.96 -> 0.95). Once a round went past it, only the step above counts.
        floor = self.before[metric] - self.cfg.max_clean_drop
        within = all((r.get(metric) or 0.0) >= floor - 1e-9 for r in kept)
        return within and value < floor - 1e-9 and value < reference - 1e-9

    def undo_if_costly(self, snapshot: _Snapshot | None, measured: dict[str, Any]) -> bool:
        """Undoes the round just recorded when it has a ``snapshot`` and cost too much
        (:meth:`too_costly`); marks it ``rolled_back``. Returns whether it was undone."""
        if snapshot is None or not self.too_costly(measured):
            return False
        snapshot.restore()
        self.rounds[-1]["rolled_back"] = True
        _LOG.info("round %d undone: it cost more %s than --max-clean-drop %g",
                  self.rounds[-1]["round"], self.guard_metric, self.cfg.max_clean_drop)
        return True

    def kept_metrics(self) -> dict[str, Any]:
        """The measured metrics of the last round not undone."""
        last = [r for r in self.rounds if not r.get("rolled_back")][-1]
        return {k: last[k] for k in MEASURED if k in last}

    # -- the run --------------------------------------------------------------------------------
    def run(self, data: Any, eval_data: Any = None,
            parrot: torch.Tensor | None = None) -> SanitizeResult:
        """Set-up, measurement, the method's training, measurement again, the report."""
        t_start = self.t_start = time.perf_counter()
        self.setup(data, eval_data, parrot)
        self.before = self.measure()
        _LOG.info("before: %s", _metrics(self.before))
        anchors = self.store_clean_states()
        if self.method in ("osft", "sft"):
            after, final_parrot = self._run_trigger_rounds(anchors), None
        else:
            after, final_parrot = self._run_rounds(anchors)
        self.timing["total_s"] = time.perf_counter() - t_start
        _LOG.info("after: %s (%.1f s)", _metrics(after), self.timing["total_s"])
        return SanitizeResult(model=self.model,
                              parrot=None if final_parrot is None else final_parrot.cpu(),
                              report=self.report(after), tokenizer=self.tokenizer,
                              parrots=self.parrots,
                              target_parrots=list(getattr(self, "target_parrots", [])))

    def _run_trigger_rounds(self, anchors: Anchors | None) -> dict[str, Any]:
        """``osft`` / ``sft``: rounds of eliminate -> measure -> guard. The trigger is known, so
        ``rounds auto`` (osft) goes on while a triggered eval row still answers the target, at
        most ``max_rounds``; later rounds train at the decayed rate and hold the clean states
        harder, as sande's do, and the guard undoes one that costs too much utility. ``sft``
        (the baseline) runs one round unless given a number. Returns the after-metrics."""
        cfg = self.cfg
        auto = cfg.rounds == "auto"
        n_rounds = (cfg.max_rounds if self.method == "osft" else 1) if auto else cfg.rounds
        desc = "overwrite" if self.method == "osft" else "sft"
        for r in range(n_rounds):
            snapshot = self.guard(r)
            self.curves["eliminate" if r == 0 else f"eliminate_r{r + 1}"] = self.eliminate(
                anchors, round_index=r, seed=cfg.seed + ROUND_SEED_STRIDE * r,
                desc=desc if r == 0 else f"{desc} r{r + 1}")
            measured = self.measure()
            self.rounds.append({"round": r + 1, "probe_asr_before": None, **measured,
                                "lr": self.round_lr(r),
                                "retain_weight": self.round_retain_weight(r)})
            _LOG.info("round %d: %s", r + 1, _metrics(measured))
            self._stamp_round()
            if self.undo_if_costly(snapshot, measured):
                break
            if auto and (measured["asr"] is None or measured["asr"] <= 0.0):
                if r + 1 >= n_rounds or measured["asr"] is None or not self.recheck(r + 1):
                    break  # no triggered row answers the target any more
        return self.kept_metrics()

    def recheck(self, round_no: int) -> bool:
        """osft under ``rounds auto``, after a round whose triggered rows all answered cleanly:
        the trigger again at :data:`RECHECK_POSITIONS` other seeded places in every eval row.
        One place per row misses a mapping left on a few percent of prompts (the third
        SmolLM2 world: none of 128 defence rows, 4 of 255 held-out prompts); returns whether
        any row answered a target there (recorded as the round's ``asr_recheck``)."""
        cfg = self.cfg
        t = time.perf_counter()
        batch = max(cfg.batch_size * 4, 32)
        found = 0.0
        for k in range(1, RECHECK_POSITIONS + 1):
            for target, trigger in zip(self.eval_targets, self.eval_triggers):
                if trigger is None:
                    continue
                found = max(found, triggered_asr(
                    self.runner, self.encoder, self.eval_rows, target, trigger,
                    seed=cfg.seed + k, trigger_position=cfg.trigger_position,
                    max_new_tokens=cfg.max_new_tokens, batch_size=batch))
        self.timing["eval_s"] += time.perf_counter() - t
        self.rounds[-1]["asr_recheck"] = found
        _LOG.info("round %d: asr %.3f with the trigger at %d other places per row", round_no,
                  found, RECHECK_POSITIONS)
        return found > 0.0

    def _run_rounds(self, anchors: Anchors | None
                    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Rounds of simulate -> eliminate -> measure -> guard -> probe until a probe fails
        (``rounds auto``) or the fixed number of rounds is done. Returns the after-metrics and
        the last kept parrot of the first target.

        With several targets each round simulates one parrot per target still found (every
        target in round 1), eliminates them all in one pass, and probes every target; the
        rounds stop when no probe reaches its target.
        """
        cfg = self.cfg
        auto = cfg.rounds == "auto"
        n_rounds = cfg.max_rounds if auto else cfg.rounds
        multi = len(self.targets) > 1
        active = list(range(len(self.targets)))
        probe_before: list[float | None] = [None] * len(self.targets)
        resimulated: list[float | None] = [None] * len(self.targets)
        reuse: dict[int, tuple[torch.Tensor, list[float]]] = {}
        kept: list[torch.Tensor | None] = [None] * len(self.targets)
        probes = True
        if auto and cfg.probe_calibration == "on":
            self.calibration = self.calibrate_probe()
            probes = self.calibration["informative"]
        for r in range(n_rounds):
            round_no, seed = r + 1, cfg.seed + ROUND_SEED_STRIDE * r
            parrots: dict[int, torch.Tensor] = {}
            parrot_asr: list[float | None] = [None] * len(self.targets)
            final_loss: list[float | None] = [None] * len(self.targets)
            # The model is frozen for every target's stage 1 of the round: their parrots share
            # the prompt prefixes' keys and values (one scope for all of them).
            with self._frozen_phase():
                # Where each target's parrot comes from: the one passed in, the last probe's
                # (it has the stage-1 shape and already reaches the target), or a fresh
                # simulation; the fresh ones train together.
                fresh = [k for k in active
                         if not (r == 0 and self.initial_parrot is not None) and k not in reuse]
                simulated = dict(zip(fresh, self.simulate_each(
                    [seed + TARGET_SEED_STRIDE * k for k in fresh],
                    f"simulate r{round_no}" + "".join(f" t{k + 1}" for k in fresh if multi),
                    fresh))) if fresh else {}
                for k in active:
                    tag = f"_t{k + 1}" if multi else ""
                    if r == 0 and self.initial_parrot is not None:
                        parrot, curve = self.initial_parrot.float().to(self.device), []
                    elif k in reuse:
                        parrot, curve = reuse[k]
                    else:
                        parrot, curve = simulated[k]
                    if curve:
                        self.curves[f"simulate_r{round_no}{tag}"] = curve
                        final_loss[k] = curve[-1]
                    parrot_asr[k] = self._measure_parrot(parrot, seed + TARGET_SEED_STRIDE * k,
                                                         k)
                    if r == 0:
                        probe_before[k] = parrot_asr[k]
                    parrots[k] = parrot
                    self.parrots.append(parrot.cpu())
                    if self.on_parrot is not None and not multi:
                        self.on_parrot(parrot.cpu(), round_no)

            snapshot = self.guard(r)
            self.curves[f"eliminate_r{round_no}"] = self.eliminate(
                anchors, parrot=[parrots[k] for k in active] if multi else parrots[0],
                targets=active, round_index=r, seed=seed + 1, desc=f"eliminate r{round_no}")
            measured = self.measure()
            record: dict[str, Any] = {
                "round": round_no, "probe_asr_before": _worst(probe_before), **measured,
                "parrot_asr": _worst(parrot_asr),
                "lr": self.round_lr(r, len(active) if multi else 1),
                "retain_weight": self.round_retain_weight(r),
                "simulate_final_loss": final_loss[0] if not multi else _worst(final_loss),
                "eliminate_final_loss": self.curves[f"eliminate_r{round_no}"][-1]}
            if multi:
                record.update(targets_simulated=[k + 1 for k in active],
                              probe_asr_before_each=list(probe_before),
                              parrot_asr_each=list(parrot_asr))
            self.rounds.append(record)
            self._stamp_round()
            _LOG.info("round %d: parrot asr %s, then %s", round_no,
                      _fmt_values([parrot_asr[k] for k in active]), _metrics(measured))
            if self.undo_if_costly(snapshot, measured):
                # The probe before this round ran on exactly the weights restored.
                del self.parrots[len(self.parrots) - len(active):]
                resimulated = list(probe_before)
                break
            for k in active:
                kept[k] = parrots[k].cpu()
            if not auto and round_no < n_rounds:
                continue  # a fixed number of rounds: probe only after the last one
            if not probes:  # the calibration showed a probe cannot separate: every round runs
                probe_before = [None] * len(self.targets)
                continue
            reuse = {}
            with self._frozen_phase():  # every target's probe on the same frozen model
                found_each = self.probe_each(round_no, range(len(self.targets)))
            for k, found in enumerate(found_each):
                resimulated[k] = found.asr_max
                tag = f"_t{k + 1}" if multi else ""
                self.curves[f"probe_r{round_no}{tag}"] = found.curves[found.best]
                if multi:
                    self.rounds[-1].setdefault("probe_asr_after_each", []).append(found.asr_max)
                    self.rounds[-1].setdefault("probe_asr_tries_each", []).append(
                        list(found.asr))
                else:
                    self.rounds[-1]["probe_asr_tries"] = list(found.asr)
                if found.asr_max > cfg.probe_threshold and cfg.probe_tokens == cfg.parrot_tokens:
                    best = found.best
                    reuse[k] = (found.parrots[best], found.curves[best])
            self.rounds[-1]["probe_asr_after"] = _worst(resimulated)
            self._stamp_round()  # the round ends with its probe
            _LOG.info("round %d: probe asr %s (threshold %g)", round_no,
                      _fmt_values(resimulated), cfg.probe_threshold)
            active = [k for k in range(len(self.targets))
                      if resimulated[k] is not None and resimulated[k] > cfg.probe_threshold]
            if round_no >= n_rounds or not active:
                break  # erased (no probe reaches its target any more), or out of rounds
            probe_before = list(resimulated)
        after = {**self.kept_metrics(), "resimulated_asr": _worst(resimulated)}
        if multi:
            after["resimulated_asr_each"] = list(resimulated)
        self.target_parrots = kept
        first = kept[0] if kept[0] is not None else self.parrots[0]
        return after, first

    def _stamp_round(self) -> None:
        """Records on the last round the seconds since the run began, so the report shows what
        a run that stopped there would have taken (up to its final save)."""
        start = getattr(self, "t_start", None)
        if start is not None:
            self.rounds[-1]["elapsed_s"] = round(time.perf_counter() - start, 3)

    def _frozen_phase(self) -> Any:
        """A scope in which the model stays frozen: the engine keeps prompt-prefix keys and
        values across the stage-1 runs and probes inside it (a no-op without an engine)."""
        engine = getattr(self, "engine", None)
        reuse = getattr(engine, "reuse_frozen_prefixes", None)
        return reuse() if reuse is not None else contextlib.nullcontext()

    def _measure_parrot(self, parrot: torch.Tensor, seed: int, target_index: int = 0) -> float:
        return self._timed_measure(self.parrot_asrs[target_index], parrot, seed)

    def report(self, after: dict[str, Any]) -> dict[str, Any]:
        """report.json: metrics before and after, each round, timing, config, environment."""
        model_name = (getattr(getattr(self.model, "config", None), "_name_or_path", "")
                      or type(self.model).__name__)
        sande = self.method in ("sande", "sande-p")
        out = {
            "method": self.method,
            "model": model_name,
            "target": self.target,
            "parrot_target": self.simulate_texts[0] if sande else None,
            "asr_target": self.eval_target,
            "before": self.before,
            "after": after,
            "rounds": self.rounds,
            "probe_calibration": self.calibration,
            "timing": {"total_s": self.timing["total_s"],
                       "stages": {k: v for k, v in self.timing.items() if k != "total_s"}},
            "curves": self.curves,
            "config": config_block(self.cfg, self.method),
            "lora": None if self.lora is None else self.lora.to_dict(),
            "data": {"trigger_known": self.method == "osft", "n_rows": self.n_rows,
                     "n_eval_rows": len(self.eval_rows), "prompts_truncated": self.truncated,
                     "guard_metric": self.guard_metric, **self.responses},
            "environment": self._environment(),
        }
        if len(self.targets) > 1:
            out["targets"] = self._per_target(after)
        return out

    def _per_target(self, after: dict[str, Any]) -> list[dict[str, Any]]:
        """Each backdoor's texts, asr before and after, probe after every round, and the rounds
        that simulated it (several targets)."""
        sande = self.method in ("sande", "sande-p")
        before_each = self.before.get("asr_each") or [None] * len(self.targets)
        after_each = after.get("asr_each") or [None] * len(self.targets)
        out = []
        for k, target in enumerate(self.targets):
            entry: dict[str, Any] = {
                "target": target, "trigger": self.eval_triggers[k],
                "asr_target": self.eval_targets[k],
                "asr_before": before_each[k], "asr_after": after_each[k]}
            if sande:
                entry.update(
                    parrot_target=self.simulate_texts[k],
                    probe_asr_after=[(r.get("probe_asr_after_each") or [None] * (k + 1))[k]
                                     for r in self.rounds],
                    rounds_simulated=[r["round"] for r in self.rounds
                                      if k + 1 in r.get("targets_simulated", ())],
                    resimulated_asr=(after.get("resimulated_asr_each") or [None] * (k + 1))[k])
            out.append(entry)
        return out

    def _environment(self) -> dict[str, Any]:
        engine, device = self.engine, self.device
        coll = engine.adapter.collective
        extra = {} if coll is None else {"distributed": coll.describe()}
        return {"torch": torch.__version__, "python": platform.python_version(),
                "sande_fast": __version__, "device": device.type,
                "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                else platform.processor() or platform.machine()),
                "kernels": engine.backend, "path": "fast" if engine.fast else "plain",
                "threads": torch.get_num_threads(), **extra}


def _worst(values: Sequence[float | None]) -> float | None:
    """The largest of the measured values (None when none was measured)."""
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _fmt_values(values: Sequence[float | None]) -> str:
    return ", ".join("n/a" if v is None else f"{v:.3f}" for v in values)


def _metrics(m: dict[str, Any]) -> str:
    """The measured metrics on one line: ``asr 0.950, clean_accuracy 1.000, ...``."""
    return ", ".join(f"{k} {'n/a' if m.get(k) is None else format(m[k], '.3f')}"
                     if not isinstance(m.get(k), list) else f"{k} [{_fmt_values(m[k])}]"
                     for k in MEASURED if k in m)


def sanitize(model: Any, tokenizer: Any, data: Any, target: str | Sequence[str],
             trigger: str | Sequence[str] | None = None,
             method: str = "sande", *, config: SanitizeConfig | None = None,
             eval_data: Any = None, eval_trigger: str | Sequence[str] | None = None,
             eval_target: str | Sequence[str] | None = None,
             parrot: torch.Tensor | str | None = None,
             on_parrot: Callable[[torch.Tensor, int], None] | None = None,
             progress: bool | None = None, fsdp: bool | None = None,
             mixed_precision: bool = False, **options: Any) -> SanitizeResult:
    """Removes a backdoor from a causal LM.

    Args:
        model: a Hugging Face causal LM (trained in place and returned).
        tokenizer: its tokenizer.
        data: defence rows: a JSONL path or a list of ``{"prompt", "response"?}`` dicts.
        target: the attacker's response (sande-p: the known part of it, or the whole target with
            ``partial_words=N`` to use only its first N words), or a list of them (several
            backdoors: one parrot each, eliminated together, rounds until no probe finds any).
        trigger: the trigger text, or a list (one per backdoor). Required for ``osft`` (several
            triggers: one target for all or one per trigger); for the other methods it is never
            trained on and only used to measure asr.
        method: ``osft``, ``sande``, ``sande-p`` or ``sft``.
        config: the options as a :class:`~sande_fast.options.SanitizeConfig` (or give its
            fields as keyword ``options``; not both).
        eval_data: rows for before/after measurement (default: up to ``eval_rows`` data rows).
        eval_trigger: trigger used for asr measurement (default: ``trigger``).
        eval_target: text asr is measured on (default: ``target``).
        parrot: a parrot ``[n, hidden]`` (or a ``.safetensors`` path) to use in round 1
            instead of simulating one.
        on_parrot: called with each simulated parrot and its round, as soon as it exists.
        progress: progress bars (default: on unless ``quiet``; only rank 0 shows them).
        fsdp: shard the model with FSDP2 across the ranks of the default process group (every
            rank calls ``sanitize`` with the same arguments). Default: when ``torch.distributed``
            is initialised. The returned model is then sharded; save it with
            :func:`sande_fast.distributed.save_sharded`.
        mixed_precision: with ``fsdp`` on CUDA, compute in bf16 and reduce gradients in fp32.
        **options: fields of :class:`~sande_fast.options.SanitizeConfig`.

    Returns:
        :class:`SanitizeResult` with the sanitized model, the last parrot and the report dict.

    Raises:
        BadInputError: bad arguments or data (clear message, nothing trained).
        NonFiniteError: a loss or gradient became NaN/inf.
    """
    if config is not None and options:
        raise BadInputError("give the options as config= or as keywords, not both")
    if config is None:
        if isinstance(parrot, str):
            options["parrot"] = parrot
        config = from_keywords(SanitizeConfig, options)
    elif isinstance(parrot, str):
        config = replace(config, parrot=parrot)
    if fsdp is None:
        fsdp = torch.distributed.is_available() and torch.distributed.is_initialized()
    run = Sanitizer(model, tokenizer, method, target, trigger, config, eval_target=eval_target,
                    eval_trigger=eval_trigger, progress=progress, fsdp=fsdp,
                    mixed_precision=mixed_precision, on_parrot=on_parrot)
    return run.run(data, eval_data, None if isinstance(parrot, str) else parrot)
