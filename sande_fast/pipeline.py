"""``sanitize()``: OSFT, SANDE, SANDE-P and the SFT baseline, with measurement before and after.

Flow of a ``sande`` run: read and tokenise the defence rows (rows without a response get the
model's own greedy answer to the clean prompt), measure, then repeat rounds of
simulate (learn a parrot on the frozen model) -> eliminate (train the model so prompt + parrot maps
to the clean answer). After each round a probe trains ``probe_tries`` (default 1) fresh parrots
of ``probe_tokens`` rows (default 1) with stage 1's budget (or ``probe_steps``) on the frozen
result; when the strongest no longer reaches the target (its asr is at most
``probe_threshold``) the backdoor is erased rather than suppressed and the loop stops. That last
probe is also the re-simulation the report states (``resimulated_asr``).

Why a one-row probe: a backdoor is a shortcut from a few trigger tokens to the target, which one
soft row reaches; the toy's clean control model (which can say the target's words in benign
rows) is pushed to the target by 6 soft rows in 95-99 % of prompts but by one row in at most 0-16 %.
"""
from __future__ import annotations

import math
import platform
import random
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

import torch

from . import __version__
from .data import BadInputError, PromptEncoder, Row, TRIGGER_POSITIONS, load_rows
from .evaluate import evaluate, greedy_generate, parrot_attack_success, _pad_id
from .io import load_parrot, resolve_device
from .stages import SPLICE_STRATEGIES, TrainRow, clean_anchors, eliminate, simulate
from .adapter import ModelAdapter, context_length
from .engine import build_engine, choose_packing
from .steps import OPTIMIZERS, LossEngine

__all__ = ["SanitizeConfig", "SanitizeResult", "sanitize", "METHODS", "prepare_rows",
           "parrot_target"]

METHODS = ("osft", "sande", "sande-p", "sft")

# AdamW's default overwrite rate over CalibratedSGD's (the RMS size of an update made from the
# largest gradient so far).
SGD_LR_RATIO = 16.0

# --max-clean-drop auto: how much clean accuracy a round after the first may cost.
AUTO_MAX_CLEAN_DROP = {"sande": 0.02, "sande-p": 0.03}


@dataclass
class SanitizeConfig:
    """Options of :func:`sanitize` (every one is also a CLI flag, ``_`` written as ``-``)."""

    seed: int = 0
    device: str = "auto"
    batch_size: int = 16
    simulate_steps: int = 200
    simulate_lr: float = 0.05
    overwrite_steps: int | None = None
    overwrite_lr: float | None = None
    optimizer: str = "auto"
    parrot_tokens: int = 6
    parrot_max_norm: float = 1.0
    parrot: str | None = None
    max_new_tokens: int = 32
    rounds: str | int = "auto"
    max_rounds: int = 4
    probe_threshold: float = 0.05
    probe_tokens: int = 1
    probe_steps: int | None = None
    probe_tries: int = 1
    round_lr_decay: float = 0.5
    round_retain_factor: float = 3.0
    max_clean_drop: float | None = None
    clean_weight: float = 3.0
    retain_weight: float = 30.0
    simulate_window: int = 10
    overwrite_window: int = 16
    trigger_position: str = "random"
    splice: str = "random"
    partial_words: int | None = None
    prompt_format: str = "auto"
    max_prompt_tokens: int | None = None
    eval_rows: int = 200
    fast: bool = True
    packed: bool | None = None
    token_budget: int = 8192
    quiet: bool = False

    def validate(self, method: str) -> None:
        """Raises :class:`BadInputError` for values no run could use."""
        if method not in METHODS:
            raise BadInputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        for name in ("batch_size", "simulate_steps", "parrot_tokens", "probe_tokens",
                     "probe_tries",
                     "max_new_tokens", "max_rounds", "simulate_window", "overwrite_window",
                     "eval_rows", "token_budget"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise BadInputError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("overwrite_steps", "probe_steps"):  # None: the default for the run
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise BadInputError(f"--{name.replace('_', '-')} must be a positive integer, "
                                    f"got {v!r}")
        for name in ("simulate_lr", "overwrite_lr"):
            v = getattr(self, name)
            # Above ~1e30 Adam's own arithmetic overflows; no useful rate is near that.
            if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0 or v > 1e30):
                raise BadInputError(f"--{name.replace('_', '-')} must be a positive number "
                                    f"(at most 1e30), got {v!r}")
        if not (0 <= self.probe_threshold <= 1):
            raise BadInputError("--probe-threshold must lie in [0, 1]")
        if self.max_clean_drop is not None and not (0 <= self.max_clean_drop <= 1):
            raise BadInputError("--max-clean-drop must lie in [0, 1]")
        if not (math.isfinite(self.round_retain_factor) and self.round_retain_factor >= 1):
            raise BadInputError("--round-retain-factor must be a number of at least 1")
        if not (0 < self.round_lr_decay <= 1):
            raise BadInputError("--round-lr-decay must lie in (0, 1]")
        if not (math.isfinite(self.parrot_max_norm) and self.parrot_max_norm >= 0):
            raise BadInputError("--parrot-max-norm must be a non-negative number (0: unbounded)")
        if self.clean_weight < 0 or not math.isfinite(self.clean_weight):
            raise BadInputError("--clean-weight must be a non-negative number")
        if self.retain_weight < 0 or not math.isfinite(self.retain_weight):
            raise BadInputError("--retain-weight must be a non-negative number")
        if self.retain_weight and not self.clean_weight and method != "sft":
            raise BadInputError("--retain-weight needs a --clean-weight above 0 (it holds the "
                                "clean rows' hidden states)")
        if self.rounds != "auto":
            try:
                r = int(self.rounds)
            except (TypeError, ValueError):
                raise BadInputError(f"--rounds must be 'auto' or a positive integer, got {self.rounds!r}") from None
            if r < 1:
                raise BadInputError("--rounds must be 'auto' or a positive integer")
            self.rounds = r
        if self.trigger_position not in TRIGGER_POSITIONS:
            raise BadInputError(f"--trigger-position must be one of {', '.join(TRIGGER_POSITIONS)}")
        if self.optimizer not in ("auto",) + OPTIMIZERS:
            raise BadInputError(f"--optimizer must be one of auto, {', '.join(OPTIMIZERS)}")
        if self.splice not in SPLICE_STRATEGIES:
            raise BadInputError(f"--splice must be one of {', '.join(SPLICE_STRATEGIES)}")
        if self.partial_words is not None and self.partial_words < 1:
            raise BadInputError("--partial-words must be a positive integer")


@dataclass
class SanitizeResult:
    """What :func:`sanitize` returns: the sanitized model, the last parrot and the report."""

    model: Any
    parrot: torch.Tensor | None
    report: dict[str, Any]
    tokenizer: Any = None
    parrots: list[torch.Tensor] = field(default_factory=list)


def parrot_target(target: str, method: str, partial_words: int | None) -> str:
    """The text stage 1 learns to emit: the whole target, or for sande-p its known first words."""
    if method == "sande-p" and partial_words:
        return " ".join(target.split()[:partial_words])
    return target


def prepare_rows(model: Any, encoder: PromptEncoder, rows: Sequence[Row], *,
                 max_new_tokens: int, batch_size: int, progress: bool) -> list[TrainRow]:
    """Tokenises defence rows; a row without a response gets the model's own greedy answer."""
    prompts = [encoder.encode_prompt(r.prompt) for r in rows]
    missing = [i for i, r in enumerate(rows) if r.response is None]
    answers: dict[int, list[int]] = {}
    if missing:
        gen = greedy_generate(model, [prompts[i].ids for i in missing],
                              pad_id=_pad_id(encoder.tokenizer), eos_id=encoder.eos_id,
                              max_new_tokens=max_new_tokens, batch_size=batch_size * 4,
                              progress=progress, desc="clean answers")
        answers = {i: g + [encoder.eos_id] for i, g in zip(missing, gen)}
    out = []
    for i, (r, p) in enumerate(zip(rows, prompts)):
        resp = answers[i] if i in answers else encoder.encode_response(r.response)
        out.append(TrainRow(r.prompt, p, tuple(resp)))
    return out


def prompt_budget(model: Any, n_parrot: int, continuation: int,
                  requested: int | None = None) -> int | None:
    """Most prompt tokens that leave room for a parrot and ``continuation`` tokens after it.

    Raises:
        BadInputError: the context is too short, or ``requested`` exceeds what fits.
    """
    ctx = context_length(model)
    if ctx is None:
        return requested
    room = ctx - n_parrot - continuation - 1
    if room < 1:
        raise BadInputError(f"the model's context ({ctx} tokens) leaves no room for a prompt next "
                            f"to {n_parrot} parrot tokens and {continuation} answer tokens; lower "
                            "--max-new-tokens, --parrot-tokens or the windows")
    if requested is not None and requested > room:
        raise BadInputError(f"--max-prompt-tokens {requested} does not fit the model's context "
                            f"({ctx} tokens); use at most {room}")
    return requested if requested is not None else room


def _auto_optimizer(method: str) -> str:
    # OSFT's edit is narrow (the trigger is known). SGD moves each weight in proportion to its
    # gradient and its steps shrink once the objective is met; AdamW moves every weight by about
    # the learning rate each step, which cost the toy 1-2 % clean accuracy on a two-word trigger.
    # The SFT baseline trains exactly as OSFT does, without the triggered term.
    return "sgd" if method in ("osft", "sft") else "adamw"


# Stage-2 steps per round by optimizer: SGD's clean terms need the later steps to pull the
# clean answers back after the overwrite term is met.
AUTO_OVERWRITE_STEPS = {"adamw": 50, "sgd": 200}


def _auto_overwrite_lr(model: Any, optimizer: str = "adamw") -> float:
    # Small models (the toy world) take a larger step than billion-parameter ones, where 2e-5 is
    # the usual fine-tuning rate. Measured on the toy: 1e-3 costs 0.3 clean accuracy.
    n = sum(p.numel() for p in model.parameters())
    lr = 1e-4 if n < 50_000_000 else 2e-5
    # CalibratedSGD's lr is the RMS size of an update from its peak gradient; 1/16 of AdamW's
    # rate was measured on the toy.
    return lr / SGD_LR_RATIO if optimizer == "sgd" else lr


def _environment(device: torch.device, engine: LossEngine) -> dict[str, Any]:
    coll = engine.adapter.collective
    extra = {} if coll is None else {"distributed": coll.describe()}
    return {"torch": torch.__version__, "python": platform.python_version(),
            "sande_fast": __version__, "device": device.type,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "kernels": engine.backend, "path": "fast" if engine.fast else "plain",
            "threads": torch.get_num_threads(), **extra}


def sanitize(model: Any, tokenizer: Any, data: Any, target: str, trigger: str | None = None,
             method: str = "sande", *, eval_data: Any = None, eval_trigger: str | None = None,
             eval_target: str | None = None, parrot: torch.Tensor | None = None,
             on_parrot: Callable[[torch.Tensor, int], None] | None = None,
             progress: bool | None = None, fsdp: bool | None = None,
             mixed_precision: bool = False, **options: Any) -> SanitizeResult:
    """Removes a backdoor from a causal LM.

    Args:
        model: a Hugging Face causal LM (trained in place and returned).
        tokenizer: its tokenizer.
        data: defence rows: a JSONL path or a list of ``{"prompt", "response"?}`` dicts.
        target: the attacker's response (sande-p: the known part of it, or the whole target with
            ``partial_words=N`` to use only its first N words).
        trigger: the trigger text. Required for ``osft``; for the other methods it is never
            trained on and only used to measure asr.
        method: ``osft``, ``sande``, ``sande-p`` or ``sft``.
        eval_data: rows for before/after measurement (default: up to ``eval_rows`` data rows).
        eval_trigger: trigger used for asr measurement (default: ``trigger``).
        eval_target: text asr is measured on (default: ``target``).
        parrot: a parrot ``[n, hidden]`` to use in round 1 instead of simulating one.
        on_parrot: called with each simulated parrot and its round, as soon as it exists (the CLI
            saves it there, so a run that dies in stage 2 can resume with ``--parrot``).
        progress: progress bars (default: on unless ``quiet``; only rank 0 shows them).
        fsdp: shard the model with FSDP2 across the ranks of the default process group (every
            rank calls ``sanitize`` with the same arguments). Default: when ``torch.distributed``
            is initialised. The returned model is then sharded; save it with
            :func:`sande_fast.distributed.save_sharded`.
        mixed_precision: with ``fsdp`` on CUDA, compute in bf16 and reduce gradients in fp32.
        **options: fields of :class:`SanitizeConfig`.

    Returns:
        :class:`SanitizeResult` with the sanitized model, the last parrot and the report dict.

    Raises:
        BadInputError: bad arguments or data (clear message, nothing trained).
        NonFiniteError: a loss or gradient became NaN/inf.
    """
    t_start = time.perf_counter()
    known = {f.name for f in fields(SanitizeConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BadInputError(f"unknown option(s): {', '.join(unknown)}")
    cfg = SanitizeConfig(**options)
    cfg.validate(method)
    if not isinstance(target, str) or not target.strip():
        raise BadInputError("--target must be a non-empty text")
    if method == "osft" and (trigger is None or not trigger.strip()):
        raise BadInputError("method osft needs --trigger (use sande when the trigger is unknown)")
    if trigger is not None and not trigger.strip():
        raise BadInputError("--trigger must not be empty")
    show = (not cfg.quiet) if progress is None else progress
    rows = load_rows(data)
    eval_rows_in = load_rows(eval_data) if eval_data is not None else None

    device = resolve_device(cfg.device)
    if fsdp is None:
        fsdp = torch.distributed.is_available() and torch.distributed.is_initialized()
    if fsdp:
        from .distributed import local_device, shard

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise BadInputError("fsdp=True needs an initialised torch.distributed process group "
                                "(run under torchrun)")
        device = local_device(device)
        show = show and torch.distributed.get_rank() == 0
    else:  # under FSDP, fully_shard moves each rank's shards to its device
        model.to(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    hidden = model.get_input_embeddings().weight.shape[1]
    if isinstance(parrot, str):
        cfg.parrot = parrot
    if cfg.parrot:
        parrot = load_parrot(cfg.parrot, hidden)
    if parrot is not None and (parrot.dim() != 2 or parrot.shape[1] != hidden):
        raise BadInputError(f"parrot has shape {tuple(parrot.shape)}; the model needs [n, {hidden}]")
    n_parrot = max(cfg.parrot_tokens, cfg.probe_tokens, 0 if parrot is None else parrot.shape[0])
    max_prompt = prompt_budget(model, n_parrot, max(cfg.overwrite_window, cfg.simulate_window,
                                                    cfg.max_new_tokens), cfg.max_prompt_tokens)
    encoder = PromptEncoder(tokenizer, cfg.prompt_format, max_prompt_tokens=max_prompt)
    adapter, packed, coll = ModelAdapter(model), cfg.packed, None
    if fsdp:
        if not cfg.fast:
            raise BadInputError("--fsdp runs the fast path only (drop --plain)")
        packed = choose_packing(adapter, cfg.packed, device=device)  # before sharding
        coll = shard(adapter, device, mixed_precision=mixed_precision)
    engine = build_engine(adapter, fast=cfg.fast, token_budget=cfg.token_budget,
                          max_batch=max(cfg.batch_size, 1), packed=packed,
                          pad_id=_pad_id(tokenizer), collective=coll)
    # Generation and evaluation run through the adapter when the model is sharded (its root
    # parameters exist only inside the adapter's forward); in one process, on the model itself.
    runner = engine.adapter if fsdp else model
    optimizer = cfg.optimizer if cfg.optimizer != "auto" else _auto_optimizer(method)
    lr = cfg.overwrite_lr or _auto_overwrite_lr(model, optimizer)
    if cfg.overwrite_steps is None:
        cfg.overwrite_steps = AUTO_OVERWRITE_STEPS[optimizer]
    # With only part of the target known the parrot is less specific: later rounds are needed
    # more often and cost a little more clean accuracy, so sande-p allows a little more.
    max_drop = (cfg.max_clean_drop if cfg.max_clean_drop is not None
                else AUTO_MAX_CLEAN_DROP.get(method, 0.02))
    measure_trigger = eval_trigger if eval_trigger is not None else trigger
    asr_target = eval_target or target
    sim_text = parrot_target(target, method, cfg.partial_words)
    sim_ids = encoder.encode_response(sim_text, add_eos=False)[:cfg.simulate_window]
    if not sim_ids:
        raise BadInputError("--target tokenises to nothing")

    timing: dict[str, float] = {"simulate_s": 0.0, "eliminate_s": 0.0, "eval_s": 0.0,
                                "probe_s": 0.0, "prepare_s": 0.0}
    t0 = time.perf_counter()
    train_rows = prepare_rows(runner, encoder, rows, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.batch_size, progress=show)
    truncated = encoder.truncated  # later encodings re-count the same prompts
    if eval_rows_in is None:
        picked = train_rows[:cfg.eval_rows]
        eval_rows = [Row(r.text, encoder.decode(r.response)) for r in picked]
    else:
        eval_rows = eval_rows_in
    probe_prompts = [r.prompt for r in train_rows[:cfg.eval_rows]]
    timing["prepare_s"] = time.perf_counter() - t0

    def measure() -> dict[str, Any]:
        t = time.perf_counter()
        m = evaluate(runner, tokenizer, eval_rows, asr_target, measure_trigger,
                     max_new_tokens=cfg.max_new_tokens, batch_size=max(cfg.batch_size * 4, 32),
                     trigger_position=cfg.trigger_position, seed=cfg.seed, encoder=encoder)
        timing["eval_s"] += time.perf_counter() - t
        out = {"asr": m["asr"] if measure_trigger is not None or eval_rows_in is not None else None,
               "clean_accuracy": m["clean_accuracy"]}
        return out

    def parrot_asr(p: torch.Tensor, seed: int) -> float:
        t = time.perf_counter()
        v = parrot_attack_success(runner, encoder, probe_prompts, p, sim_text, seed=seed,
                                  max_new_tokens=cfg.max_new_tokens,
                                  batch_size=max(cfg.batch_size * 4, 32))
        timing["eval_s"] += time.perf_counter() - t
        return v

    def run_simulate(seed: int, desc: str, n_tokens: int,
                     steps: int | None = None) -> tuple[torch.Tensor, list[float], float]:
        t = time.perf_counter()
        p, curve = simulate(engine, train_rows, sim_ids, steps=steps or cfg.simulate_steps,
                            lr=cfg.simulate_lr, n_tokens=n_tokens,
                            max_norm=cfg.parrot_max_norm or None,
                            batch_size=cfg.batch_size, seed=seed, splice=cfg.splice,
                            progress=show, desc=desc)
        return p, curve, time.perf_counter() - t

    before = measure()
    anchors = None
    if cfg.retain_weight:
        # The original model's hidden states on the clean rows, held by every round.
        t = time.perf_counter()
        anchors = clean_anchors(engine, train_rows, cfg.overwrite_window)
        timing["prepare_s"] += time.perf_counter() - t
    curves: dict[str, list[float]] = {}
    rounds: list[dict[str, Any]] = []
    parrots: list[torch.Tensor] = []
    resimulated = None
    final_parrot = None

    if method in ("osft", "sft"):
        t = time.perf_counter()
        curves["eliminate"] = eliminate(
            engine, train_rows, steps=cfg.overwrite_steps, lr=lr, batch_size=cfg.batch_size,
            seed=cfg.seed, window=cfg.overwrite_window, clean_weight=cfg.clean_weight,
            trigger=trigger if method == "osft" else None, encoder=encoder,
            trigger_position=cfg.trigger_position, progress=show,
            desc="overwrite" if method == "osft" else "sft", retain_weight=cfg.retain_weight,
            anchors=anchors, optimizer=optimizer)
        timing["eliminate_s"] += time.perf_counter() - t
        after = measure()
        rounds.append({"round": 1, "probe_asr_before": None, **after})
    else:
        auto = cfg.rounds == "auto"
        max_rounds = cfg.max_rounds if auto else int(cfg.rounds)
        r = 0
        probe_before: float | None = None
        reuse: tuple[torch.Tensor, list[float]] | None = None
        while True:
            seed = cfg.seed + 1000 * r
            if r == 0 and parrot is not None:
                p, curve = parrot.float().to(device), []
            elif reuse is not None:  # the last probe's parrot has the stage-1 shape: reuse it
                p, curve = reuse
            else:
                p, curve, dt = run_simulate(seed, f"simulate r{r + 1}", cfg.parrot_tokens)
                timing["simulate_s"] += dt
            if curve:
                curves[f"simulate_r{r + 1}"] = curve
            parrot_asr_r = parrot_asr(p, seed)
            if r == 0:
                probe_before = parrot_asr_r
            parrots.append(p.cpu())
            final_parrot = p
            if on_parrot is not None:
                on_parrot(p.cpu(), r + 1)
            round_lr = lr * (cfg.round_lr_decay ** r)
            # A later round faces a backdoor already suppressed and needs a smaller change, while
            # the clean accuracy it may still cost is what the first round left: hold the clean
            # states harder.
            round_retain = cfg.retain_weight * (cfg.round_retain_factor if r else 1.0)
            # Rounds after the first are optional: keep the weights to undo one that costs more
            # clean accuracy than allowed (one process only; a sharded model just stops).
            guard = (r > 0 and auto and not fsdp and before.get("clean_accuracy") is not None)
            snapshot = ({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                        if guard else None)
            t = time.perf_counter()
            curves[f"eliminate_r{r + 1}"] = eliminate(
                engine, train_rows, steps=cfg.overwrite_steps, lr=round_lr,
                batch_size=cfg.batch_size, seed=seed + 1, window=cfg.overwrite_window,
                clean_weight=cfg.clean_weight, parrot=p, splice=cfg.splice, progress=show,
                desc=f"eliminate r{r + 1}", retain_weight=round_retain, anchors=anchors,
                optimizer=optimizer)
            timing["eliminate_s"] += time.perf_counter() - t
            m = measure()
            rounds.append({"round": r + 1, "probe_asr_before": probe_before, **m,
                           "parrot_asr": parrot_asr_r, "lr": round_lr,
                           "retain_weight": round_retain,
                           "simulate_final_loss": curve[-1] if curve else None,
                           "eliminate_final_loss": curves[f"eliminate_r{r + 1}"][-1]})
            drop = before["clean_accuracy"] - (m["clean_accuracy"] or 0.0) if guard else 0.0
            if snapshot is not None and drop > max_drop + 1e-9:  # eval counts, not floats
                # Undo this round. The probe before it ran on exactly the weights now restored.
                model.load_state_dict(snapshot)
                rounds[-1]["rolled_back"] = True
                resimulated = probe_before
                parrots.pop()
                final_parrot = parrots[-1]
                break
            r += 1
            if not auto and r < max_rounds:
                continue  # a fixed number of rounds: probe only after the last one
            # Probe: fresh parrots of probe_tokens rows (stage 1's budget unless probe_steps is
            # set), the weights frozen; the strongest of probe_tries counts.
            tries = []
            for k in range(cfg.probe_tries):
                q_k, curve_k, dt = run_simulate(seed + 500 + k, f"probe r{r}", cfg.probe_tokens,
                                                cfg.probe_steps)
                timing["probe_s"] += dt
                tries.append((parrot_asr(q_k, seed + 500 + k), q_k, curve_k))
            resimulated, q, q_curve = max(tries, key=lambda x: x[0])
            rounds[-1]["probe_asr_after"] = resimulated
            rounds[-1]["probe_asr_tries"] = [x[0] for x in tries]
            curves[f"probe_r{r}"] = q_curve
            if r >= max_rounds or resimulated <= cfg.probe_threshold:
                break  # erased (the probe no longer reaches the target), or out of rounds
            probe_before = resimulated
            reuse = (q, q_curve) if cfg.probe_tokens == cfg.parrot_tokens else None
        after = dict(measure_last(rounds))
        after["resimulated_asr"] = resimulated

    timing["total_s"] = time.perf_counter() - t_start
    model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    report = {
        "method": method,
        "model": model_name,
        "target": target,
        "parrot_target": sim_text if method in ("sande", "sande-p") else None,
        "asr_target": asr_target,
        "before": before,
        "after": after,
        "rounds": rounds,
        "timing": {"total_s": timing["total_s"],
                   "stages": {k: v for k, v in timing.items() if k != "total_s"}},
        "curves": curves,
        "config": {**asdict(cfg), "method": method, "overwrite_lr": lr, "optimizer": optimizer,
                   "max_clean_drop": max_drop,
                   "trigger_known": method == "osft", "n_rows": len(rows),
                   "n_eval_rows": len(eval_rows), "prompts_truncated": truncated,
                   "prompt_format": encoder.prompt_format},
        "environment": _environment(device, engine),
    }
    return SanitizeResult(model=model, parrot=None if final_parrot is None else final_parrot.cpu(),
                          report=report, tokenizer=tokenizer, parrots=parrots)


def measure_last(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The after-metrics are those measured at the end of the last round that was kept."""
    last = [r for r in rounds if not r.get("rolled_back")][-1]
    return {"asr": last["asr"], "clean_accuracy": last["clean_accuracy"]}
