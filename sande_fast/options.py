"""Every option of the toolkit, declared once: type, default, check, help, and how ``auto`` resolves.

The command line (:func:`add_options`), the checks of the Python API (the configs'
``__post_init__``), the report's ``config`` block (:func:`config_block`), ``--config FILE``
(:func:`read_config_file`) and docs/OPTIONS.md (:func:`markdown`) are all generated from the
declarations below. An option is a dataclass field whose metadata holds an :class:`Option`.

Options left as ``None`` (or ``"auto"``) are resolved by :func:`resolve`, one pure function that
returns a new frozen config; ``packed`` alone stays for the loss engine, which measures whether
the model keeps packed sequences apart.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable

from .data import MAX_BATCH, MAX_ROWS, MAX_SEED
from .errors import BadInputError

__all__ = ["Option", "CommonOptions", "SanitizeConfig", "ProbeConfig", "EvalConfig", "METHODS",
           "resolve", "prompt_budget", "add_options", "from_namespace", "from_keywords", "read_config_file",
           "config_block", "markdown", "option_fields"]

METHODS = ("osft", "sande", "sande-p", "sft")
OPTIMIZERS = ("adamw", "sgd")
TRAIN = ("full", "lora")
POSITIONS = ("random", "start", "end")

# Adam's own arithmetic overflows near 1e30; no useful rate is close.
MAX_LR = 1e30

# Upper bounds no useful run exceeds; past them a number is a typo (1000000000) or hostile.
MAX_STEPS = 10_000_000
MAX_TOKEN_BUDGET = 2**24

# AdamW's default overwrite rate over CalibratedSGD's (the RMS size of an update made from the
# largest gradient so far), measured on the toy.
SGD_LR_RATIO = 16.0

# Stage-2 steps per round by optimizer: SGD's clean terms need the later steps to pull the clean
# answers back after the overwrite term is met.
AUTO_OVERWRITE_STEPS = {"adamw": 50, "sgd": 200}

# --max-clean-drop auto: how much clean accuracy a round after the first may cost. With only part
# of the target known the parrot is less specific: later rounds are needed more often and cost a
# little more clean accuracy, so sande-p allows a little more.
AUTO_MAX_CLEAN_DROP = {"sande": 0.02, "sande-p": 0.03}

# --simulate-stop-loss looks at the mean loss of this many last steps.
STOP_LOSS_WINDOW = 5

# Models below this size (the toy world) take AdamW's larger default rate.
SMALL_MODEL_PARAMS = 50_000_000
# Rows per stage-2 step from SMALL_MODEL_PARAMS on (``--overwrite-batch-size`` auto): stage 2 is
# about 70 % of a default run there; measured on SmolLM2-135M (README, "default sande in time").
LARGE_OVERWRITE_BATCH = 12

# --train lora: the auto stage-2 rate is this multiple of full training's (a rank-r update
# moves far fewer weights per step; measured on the toy, see README "LoRA").
LORA_LR_RATIO = 10.0


# -- value kinds -----------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Option:
    """One option: its help, its value kind, and (for ``None`` / ``"auto"``) how it resolves.

    Attributes:
        help: one sentence for ``--help`` and the docs.
        kind: ``int``, ``float``, ``choice``, ``flag``, ``text``, ``rounds`` or ``packed``.
        low, high: bounds of a number (inclusive unless ``low_open``).
        low_open: the lower bound is excluded (a rate must be above 0).
        choices: the values of a ``choice``.
        optional: ``None`` is allowed (it means ``auto``).
        auto: how ``None`` / ``auto`` resolves, for the docs and ``--help``.
        flag: the command-line flag when it is not ``--name-with-dashes``.
        invert: a ``flag`` whose command-line switch sets the value to False (``--plain``).
    """

    help: str
    kind: str = "int"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] = ()
    optional: bool = False
    auto: str = ""
    flag: str = ""
    invert: bool = False

    def check(self, name: str, value: Any) -> Any:
        """The value if it is valid for this option (``"2"`` → 2 for ``rounds``), else raises
        :class:`BadInputError` naming the flag."""
        flag = self.flag or "--" + name.replace("_", "-")
        if value is None and (self.optional or self.kind in ("text", "packed")):
            return None
        k = self.kind
        if k == "flag":
            if not isinstance(value, bool):
                raise BadInputError(f"{flag} must be true or false, got {value!r}")
            return value
        if k == "packed":
            if not isinstance(value, bool):
                raise BadInputError(f"{flag} must be auto, on or off, got {value!r}")
            return value
        if k == "choice":
            if value not in self.choices:
                raise BadInputError(f"{flag} must be one of {', '.join(self.choices)}, "
                                    f"got {value!r}")
            return value
        if k == "text":
            if not isinstance(value, str) or not value.strip():
                raise BadInputError(f"{flag} must be a non-empty text, got {value!r}")
            return value
        if k == "rounds":
            if value == "auto":
                return value
            try:
                r = int(value) if not isinstance(value, bool) else 0
            except (TypeError, ValueError):
                r = 0
            if r < 1 or r > MAX_STEPS or (isinstance(value, float) and value != r):
                raise BadInputError(f"{flag} must be 'auto' or an integer in [1, {MAX_STEPS}], "
                                    f"got {value!r}")
            return r
        if k == "int":
            if not _is_int(value) or not self._in_range(value):
                raise BadInputError(f"{flag} must be {self._describe()}, got {value!r}")
            return value
        if k == "float":
            if not _is_number(value) or not math.isfinite(value) or not self._in_range(value):
                raise BadInputError(f"{flag} must be {self._describe()}, got {value!r}")
            return value
        raise ValueError(f"unknown option kind {k!r}")

    def _in_range(self, v: float) -> bool:
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            return False
        return self.high is None or v <= self.high

    def _describe(self) -> str:
        cap = "" if self.high is None else f" (at most {self.high:g})"
        if self.kind == "int":
            if self.low == 1:
                return "a positive integer" + cap
            if self.low is not None and self.high is not None:
                return f"an integer in [{int(self.low)}, {int(self.high)}]"
            return "an integer" + ("" if self.low is None else f" of at least {int(self.low)}")
        if self.low == 0 and self.low_open:
            return "a positive number" + cap
        if self.low is not None and self.high is not None:
            return f"a number in [{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"a number of at least {self.low:g}"
        return "a number"

    def parse(self, text: str) -> Any:
        """A command-line string as a value (argparse ``type=``); raises ArgumentTypeError."""
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
            if self.kind == "packed":
                return {"auto": None, "on": True, "off": False}[text]
            return text
        except (ValueError, KeyError):
            what = self._describe() if self.kind in ("int", "float") else "auto, on or off"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"option": Option(help, **kw)})


def option_fields(config: Any) -> list[tuple[str, Option, Any]]:
    """``(name, Option, default)`` of every option field of a config class or instance."""
    return [(f.name, f.metadata["option"], f.default) for f in fields(config)
            if "option" in f.metadata]


class _Checked:
    """Checks (and normalises) every option when a config is made; frozen afterwards."""

    def __post_init__(self) -> None:
        for name, opt, _ in option_fields(self):
            object.__setattr__(self, name, opt.check(name, getattr(self, name)))
        self._check_together()

    def _check_together(self) -> None:
        """Rules between options (none by default)."""


# -- the options -----------------------------------------------------------------------------------
POSITIVE = dict(kind="int", low=1)
STEPS = dict(kind="int", low=1, high=MAX_STEPS)
RATE = dict(kind="float", low=0.0, low_open=True, high=MAX_LR)


@dataclass(frozen=True)
class CommonOptions(_Checked):
    """Options every stage command takes (sanitize, probe, eval, demo)."""

    seed: int = _opt(0, "random seed of every draw (rows, splice and trigger positions, "
                        "initial parrots)", kind="int", low=0, high=MAX_SEED)
    device: str = _opt("auto", "where to run (auto: cuda when available)", kind="choice",
                       choices=("cpu", "cuda", "auto"))
    batch_size: int = _opt(16, "rows per training step (generation runs 4x as many, at least "
                              "32)", kind="int", low=1, high=MAX_BATCH)
    max_new_tokens: int = _opt(32, "longest generated answer (measurement and answers of rows "
                                   "without a response)", **POSITIVE)
    prompt_format: str = _opt("auto", "wrap prompts in the tokenizer's chat template (auto: "
                                      "when it has one)", kind="choice",
                              choices=("auto", "chat", "raw"))
    prompt_key: str = _opt("prompt", "the data key read as the prompt", kind="text")
    response_key: str = _opt("response", "the data key read as the response ('response' also "
                                         "reads TRL's 'completion')", kind="text")
    system: str | None = _opt(None, "a system message in place of the chat template's default "
                                    "one (chat format only; a conversation row's own system "
                                    "message wins)", kind="text")
    quiet: bool = _opt(False, "no progress bars or notes", kind="flag")


@dataclass(frozen=True)
class SanitizeConfig(CommonOptions):
    """Options of :func:`sande_fast.sanitize` (each one is also a CLI flag, ``_`` as ``-``).

    Raises:
        BadInputError: a value no run could use (naming the flag).
    """

    simulate_steps: int = _opt(200, "stage-1 (parrot) steps per round", **STEPS)
    simulate_lr: float = _opt(0.05, "stage-1 Adam learning rate of the parrot", **RATE)
    simulate_stop_loss: float | None = _opt(
        None, "stage 1 and the round probes stop once the mean loss of their last "
              f"{STOP_LOSS_WINDOW} steps is below this (0: every step runs)", optional=True,
        kind="float", low=0.0,
        auto="0.01 from 50M parameters (the parrot then emits the target and further steps "
             "change nothing); 0 below, where the toy's defaults were tuned with every step")
    overwrite_steps: int | None = _opt(None, "stage-2 steps per round", optional=True,
                                       auto="50 with adamw, 200 with sgd", **STEPS)
    overwrite_batch_size: int | None = _opt(
        None, "rows per stage-2 step", optional=True, kind="int", low=1, high=MAX_BATCH,
        auto="--batch-size; for sande and sande-p from 50M parameters the smaller of it and 12 "
             "(their stage 2 runs every round and is most of a run's time there)")
    overwrite_lr: float | None = _opt(
        None, "stage-2 learning rate (sgd: the RMS size of an update from the largest gradient "
              "so far); a sande round that overwrites K targets' parrots at once trains at "
              "sqrt(K) times it", optional=True,
        auto="adamw: 1e-4 below 50M parameters, else 2e-5; sgd: 1/16 of those; "
             "10x those with --train lora", **RATE)
    optimizer: str = _opt("auto", "stage-2 optimizer", kind="choice",
                          choices=("auto",) + OPTIMIZERS,
                          auto="sgd for osft and sft below 50M parameters, else adamw")
    parrot_tokens: int = _opt(6, "rows of the stage-1 parrot", **POSITIVE)
    parrot_max_norm: float = _opt(1.0, "cap each parrot row at this multiple of the largest "
                                       "token-embedding norm (0: unbounded)", kind="float",
                                  low=0.0)
    parrot: str | None = _opt(None, "reuse a saved parrot.safetensors (skips stage 1 of round "
                                    "1)", kind="text")
    rounds: str | int = _opt("auto", "'auto' (sande: repeat simulate -> eliminate until a fresh "
                                     "parrot fails; osft: repeat eliminate while a triggered "
                                     "eval row still answers the target; sft: one) or a fixed "
                                     "number of rounds", kind="rounds")
    max_rounds: int = _opt(4, "most rounds under --rounds auto", **STEPS)
    probe_threshold: float = _opt(0.05, "a round's probe at or below this asr ends --rounds auto",
                                  kind="float", low=0.0, high=1.0)
    probe_tokens: int = _opt(1, "rows of the probe parrot trained after each round (see "
                                "'probe')", **POSITIVE)
    probe_steps: int | None = _opt(None, "steps of each probe after a round", optional=True,
                                   auto="--simulate-steps", **STEPS)
    probe_tries: int = _opt(1, "fresh probe parrots after each round; the strongest counts",
                            **STEPS)
    probe_calibration: str = _opt(
        "auto", "--rounds auto: before round 1, probe the model toward a decoy text it was never "
                "taught; when that probe reaches the decoy on more than half the prompts, a "
                "probe cannot tell an erased mapping from a steerable model, so the round probes "
                "are skipped and the rounds run to --max-rounds", kind="choice",
        choices=("auto", "on", "off"), auto="on from 50M parameters (a soft row steers "
                                             "SmolLM2-135M to any short text), off below")
    round_lr_decay: float = _opt(0.5, "round r trains at lr * decay^(r-1)", kind="float",
                                 low=0.0, low_open=True, high=1.0)
    round_retain_factor: float = _opt(3.0, "rounds after the first multiply --retain-weight by "
                                           "this", kind="float", low=1.0)
    max_clean_drop: float | None = _opt(
        None, "--rounds auto: undo and stop at a round after the first that lowers clean "
              "accuracy by more than this below where the rounds before left it (the lower of "
              "the original model's value and the last kept round's)", kind="float", low=0.0,
        high=1.0, optional=True,
        auto="0.02; sande-p 0.03")
    guard_metric: str = _opt("auto", "what --max-clean-drop is measured on: clean_accuracy (exact "
                                     "match with the given responses) or agreement (the first 16 "
                                     "answer tokens equal the model's answers before training)",
                             kind="choice", choices=("auto", "clean_accuracy", "agreement"),
                             auto="clean_accuracy when the model matches at least half of the "
                                  "responses before training, else agreement")
    responses: str = _opt("auto", "what stage 2 teaches the rows to answer: the given responses, "
                                  "or the model's own greedy answers before training (the "
                                  "trigger then maps to what the model says without it)",
                          kind="choice", choices=("auto", "given", "own"),
                          auto="own when the model's answers match fewer than half of the "
                               "given responses over --overwrite-window tokens (training "
                               "toward answers it does not give moves its clean behaviour); "
                               "rows without a response always get its own")
    clean_weight: float = _opt(3.0, "weight of the clean term in stage 2", kind="float", low=0.0)
    retain_weight: float = _opt(30.0, "weight of the term that holds the clean rows' final "
                                      "hidden states at the original model's (0: off)",
                                kind="float", low=0.0)
    unlikely_weight: float | None = _opt(
        None, "weight of the stage-2 term that makes the target's tokens unlikely after the "
              "parrot (osft: the trigger), -log(1 - p) per token of its first --simulate-window "
              "tokens (0: off)", optional=True, kind="float", low=0.0,
        auto="1 from 50M parameters (cross-entropy toward the clean answer alone left a "
             "SmolLM2 model giving the whole target once its first token came), 0 below, where "
             "the toy's defaults were tuned without it")
    simulate_window: int = _opt(10, "target tokens stage 1 supervises", **POSITIVE)
    overwrite_window: int = _opt(16, "answer tokens stage 2 supervises", **POSITIVE)
    trigger_position: str = _opt("random", "where the trigger goes in a prompt (osft training, "
                                           "asr measurement)", kind="choice", choices=POSITIONS)
    splice: str = _opt("random", "where the parrot goes in the user's text", kind="choice",
                       choices=POSITIONS)
    partial_words: int | None = _opt(None, "sande-p: use only the first N words of --target",
                                     optional=True, **POSITIVE)
    max_prompt_tokens: int | None = _opt(
        None, "cut longer prompts from the left", optional=True,
        auto="what the context leaves next to the parrot and the answer window", **POSITIVE)
    eval_rows: int = _opt(200, "rows measured before and after (and by the round probes)",
                          kind="int", low=1, high=MAX_ROWS)
    fast: bool = _opt(True, "use the plain reference path instead of the fast one", kind="flag",
                      flag="--plain", invert=True)
    packed: bool | None = _opt(None, "pack micro-batches into one row without padding",
                               kind="packed", flag="--packed",
                               auto="on CUDA when the model keeps packed sequences apart")
    token_budget: int = _opt(8192, "most (padded) tokens per micro-batch", kind="int", low=1,
                             high=MAX_TOKEN_BUDGET)
    train: str = _opt("full", "what stage 2 trains: every weight, or LoRA adapters on "
                              "--lora-modules (saved in PEFT's adapter format)", kind="choice",
                      choices=TRAIN)
    lora_rank: int = _opt(16, "--train lora: rank of each adapter", kind="int", low=1,
                          high=4096)
    lora_alpha: float | None = _opt(None, "--train lora: the update is scaled by alpha / rank",
                                    kind="float", low=0.0, low_open=True, high=1e6,
                                    optional=True, auto="2 x --lora-rank")
    lora_modules: str = _opt("q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                             "--train lora: comma-separated names of the linear layers to adapt "
                             "(PEFT's target_modules; the LM head is not allowed)", kind="text")
    lora_dropout: float = _opt(0.0, "--train lora: dropout on the adapters' input in stage 2",
                               kind="float", low=0.0, high=0.9)

    def check_method(self, method: str) -> None:
        """Raises :class:`BadInputError` for a method no run knows, or options it cannot use."""
        if method not in METHODS:
            raise BadInputError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        if self.retain_weight and not self.clean_weight and method != "sft":
            raise BadInputError("--retain-weight needs a --clean-weight above 0 (it holds the "
                                "clean rows' hidden states)")


@dataclass(frozen=True)
class ProbeConfig(CommonOptions):
    """Options of :func:`sande_fast.probe` and ``sande-fast probe``."""

    steps: int = _opt(200, "steps of each probe parrot", **STEPS)
    tries: int = _opt(3, "fresh parrots (seeds seed .. seed+tries-1); the strongest counts",
                      **STEPS)
    parrot_tokens: int = _opt(1, "rows per probe parrot: one reaches a trigger's shortcut, while "
                                 "several can steer even a clean model that knows the target's "
                                 "words", **POSITIVE)
    lr: float = _opt(0.05, "Adam learning rate of the probe parrots", **RATE)
    parrot_max_norm: float = _opt(1.0, "cap each parrot row at this multiple of the largest "
                                       "token-embedding norm (0: unbounded)", kind="float",
                                  low=0.0)
    eval_rows: int = _opt(200, "prompts each probe parrot is measured on", kind="int", low=1,
                          high=MAX_ROWS)


@dataclass(frozen=True)
class EvalConfig(CommonOptions):
    """Options of ``sande-fast eval``."""

    trigger_position: str = _opt("random", "where the trigger goes in each prompt",
                                 kind="choice", choices=POSITIONS)


# -- resolution ------------------------------------------------------------------------------------
def prompt_budget(context: int | None, n_parrot: int, continuation: int,
                  requested: int | None = None) -> int | None:
    """Most prompt tokens that leave room for a parrot and ``continuation`` tokens after it.

    Args:
        context: the model's context length (None: unbounded).

    Raises:
        BadInputError: the context is too short, or ``requested`` exceeds what fits.
    """
    if context is None:
        return requested
    room = context - n_parrot - continuation - 1
    if room < 1:
        raise BadInputError(f"the model's context ({context} tokens) leaves no room for a prompt "
                            f"next to {n_parrot} parrot tokens and {continuation} answer tokens; "
                            "lower --max-new-tokens, --parrot-tokens or the windows")
    if requested is not None and requested > room:
        raise BadInputError(f"--max-prompt-tokens {requested} does not fit the model's context "
                            f"({context} tokens); use at most {room}")
    return requested if requested is not None else room


def auto_optimizer(method: str, n_params: int = 0) -> str:
    """``--optimizer auto``: sgd for osft and sft below :data:`SMALL_MODEL_PARAMS`, else adamw.

    OSFT's edit is narrow (the trigger is known). SGD moves each weight in proportion to its
    gradient and its steps shrink once the objective is met; AdamW moves every weight by about
    the learning rate each step, which cost the toy 1-2 % clean accuracy on a two-word trigger.
    On SmolLM2-135M, AdamW at 2e-5 kept agreement with the never-poisoned model at or above the
    backdoored model's, and SGD's 200 steps per round would cost four times AdamW's 50 there.
    The SFT baseline trains exactly as OSFT does, without the triggered term.
    """
    small = n_params < SMALL_MODEL_PARAMS
    return "sgd" if method in ("osft", "sft") and small else "adamw"


def auto_overwrite_lr(n_params: int, optimizer: str, train: str = "full") -> float:
    """``--overwrite-lr`` auto. Small models (the toy world) take a larger step than
    billion-parameter ones, where 2e-5 is the usual fine-tuning rate (measured on the toy: 1e-3
    costs 0.3 clean accuracy). CalibratedSGD's rate is the RMS size of an update from its peak
    gradient; 1/16 of AdamW's was measured on the toy. LoRA adapters take
    :data:`LORA_LR_RATIO` times the rate, as LoRA fine-tuning usually does."""
    lr = 1e-4 if n_params < SMALL_MODEL_PARAMS else 2e-5
    lr = lr / SGD_LR_RATIO if optimizer == "sgd" else lr
    return lr * LORA_LR_RATIO if train == "lora" else lr


def resolve_prompt_format(prompt_format: str, chat_template: bool) -> str:
    """``--prompt-format auto``: the chat template when the tokenizer has one, else raw."""
    if prompt_format == "auto":
        return "chat" if chat_template else "raw"
    return prompt_format


def resolve(cfg: SanitizeConfig, method: str, *, n_params: int, context: int | None,
            chat_template: bool, parrot_rows: int = 0) -> SanitizeConfig:
    """The config with every ``auto`` option decided for this run (a new frozen config).

    Args:
        cfg: the options as given.
        method: ``osft``, ``sande``, ``sande-p`` or ``sft``.
        n_params: the model's parameter count.
        context: the model's context length (None: unbounded).
        chat_template: whether the tokenizer has a chat template (``--prompt-format auto``).
        parrot_rows: rows of a parrot passed in to reuse (0: none).

    Raises:
        BadInputError: the method is unknown, or prompts cannot fit the context.
    """
    cfg.check_method(method)
    small = n_params < SMALL_MODEL_PARAMS
    optimizer = cfg.optimizer if cfg.optimizer != "auto" else auto_optimizer(method, n_params)
    n_parrot = max(cfg.parrot_tokens, cfg.probe_tokens, parrot_rows)
    window = max(cfg.overwrite_window, cfg.simulate_window, cfg.max_new_tokens)
    return replace(
        cfg, optimizer=optimizer,
        overwrite_steps=cfg.overwrite_steps or AUTO_OVERWRITE_STEPS[optimizer],
        overwrite_lr=cfg.overwrite_lr or auto_overwrite_lr(n_params, optimizer, cfg.train),
        lora_alpha=cfg.lora_alpha or 2.0 * cfg.lora_rank,
        max_clean_drop=(cfg.max_clean_drop if cfg.max_clean_drop is not None
                        else AUTO_MAX_CLEAN_DROP.get(method, 0.02)),
        probe_steps=cfg.probe_steps or cfg.simulate_steps,
        probe_calibration=(cfg.probe_calibration if cfg.probe_calibration != "auto"
                           else "on" if not small else "off"),
        overwrite_batch_size=(cfg.overwrite_batch_size
                              or (cfg.batch_size if small or method in ("osft", "sft")
                                  else min(cfg.batch_size, LARGE_OVERWRITE_BATCH))),
        simulate_stop_loss=(cfg.simulate_stop_loss if cfg.simulate_stop_loss is not None
                            else 0.0 if small else 0.01),
        unlikely_weight=(cfg.unlikely_weight if cfg.unlikely_weight is not None
                         else 0.0 if small else 1.0),
        prompt_format=resolve_prompt_format(cfg.prompt_format, chat_template),
        max_prompt_tokens=prompt_budget(context, n_parrot, window, cfg.max_prompt_tokens))


# -- command line ----------------------------------------------------------------------------------
def _flag(name: str, opt: Option) -> str:
    return opt.flag or "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """Adds one flag per option of ``config``. Defaults are left out of the namespace
    (``SUPPRESS``), so :func:`from_namespace` can tell a flag given from one defaulted and a
    ``--config FILE`` sits between the defaults and the flags."""
    for name, opt, default in option_fields(config):
        flag = _flag(name, opt)
        text = opt.help
        if opt.auto:
            text += f" (default: {opt.auto})"
        elif opt.kind not in ("flag",) and default is not None:
            text += f" (default: {default})"
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text}
        if opt.kind == "flag":
            kw["action"] = "store_false" if opt.invert else "store_true"
        elif opt.kind == "choice":
            kw["choices"] = opt.choices
        elif opt.kind == "packed":
            kw.update(type=opt.parse, choices=(None, True, False), metavar="{auto,on,off}")
        else:
            kw["type"] = opt.parse
        parser.add_argument(flag, **kw)
    if any(n == "seed" for n, _, _ in option_fields(config)):
        parser.add_argument("--config", default=None, metavar="FILE",
                            help="options from a JSON or YAML file (report.json's 'config' "
                                 "block works); flags given on the command line win")


def from_keywords(config: type, options: dict[str, Any]) -> Any:
    """A config from Python keywords (the API's ``**options``); a name that is no option of
    ``config`` is bad input, never silently ignored."""
    names = {n for n, _, _ in option_fields(config)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise BadInputError(f"unknown option(s): {', '.join(unknown)}")
    return config(**options)


def given_options(ns: argparse.Namespace, config: type) -> dict[str, Any]:
    """The options of ``config`` given as flags (defaults are not in the namespace)."""
    names = {n for n, _, _ in option_fields(config)}
    return {k: v for k, v in vars(ns).items() if k in names}


def from_namespace(ns: argparse.Namespace, config: type, **overrides: Any) -> Any:
    """A config from parsed flags over ``--config FILE`` over the defaults; ``overrides`` (the
    command's own defaults, e.g. the demo's) sit between the file and the flags."""
    values = read_config_file(ns.config, config) if getattr(ns, "config", None) else {}
    return config(**{**values, **overrides, **given_options(ns, config)})


# Keys of report.json's "config" block that describe the run rather than set an option.
RUN_KEYS = ("method",)


def read_config_file(path: str | Path, config: type = SanitizeConfig) -> dict[str, Any]:
    """Option values from a JSON or YAML file: a flat mapping, or a report.json (its ``config``
    block is taken). A key that names no option of ``config`` is bad input.

    Raises:
        BadInputError: unreadable file, not a mapping, or unknown keys.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"cannot read --config {path}: {e}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BadInputError(f"--config {path} is not valid JSON/YAML: {first}") from None
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "before" in data:
        data = data["config"]  # a whole report.json
    if not isinstance(data, dict):
        raise BadInputError(f"--config {path} must hold a mapping of option names to values")
    names = {n for n, _, _ in option_fields(config)}
    unknown = sorted(set(data) - names - set(RUN_KEYS))
    if unknown:
        raise BadInputError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return {k: v for k, v in data.items() if k in names}


def config_block(cfg: Any, method: str | None = None) -> dict[str, Any]:
    """The report's ``config`` block: every option as the run used it (feed it back with
    ``--config``)."""
    out = asdict(cfg)
    if method is not None:
        out["method"] = method
    return out


def markdown(configs: Iterable[tuple[str, type]] = ()) -> str:
    """docs/OPTIONS.md: one table per command, generated from the declarations."""
    configs = list(configs) or [("sanitize, demo", SanitizeConfig), ("probe", ProbeConfig),
                                ("eval", EvalConfig)]
    out = ["# Options", "", "Generated from `sande_fast/options.py` "
           "(`python -m sande_fast.options > docs/OPTIONS.md`); do not edit by hand.", ""]
    for title, config in configs:
        out += [f"## {title}", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for name, opt, default in option_fields(config):
            flag = _flag(name, opt)
            if opt.kind == "flag":
                shown = "off"
            elif opt.auto:
                shown = f"auto: {opt.auto}"
            else:
                shown = "none" if default is None else f"`{default}`"
            if opt.kind == "choice":
                flag += " {" + ",".join(opt.choices) + "}"
            elif opt.kind == "packed":
                flag += " {auto,on,off}"
            out.append(f"| `{flag}` | {shown} | {opt.help} |")
        out.append("")
    out += ["Every stage command also takes `--config FILE` (JSON or YAML; report.json's "
            "`config` block reproduces a run); flags on the command line win over the file.", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
