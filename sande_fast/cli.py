"""The ``sande-fast`` command (also ``python -m sande_fast``).

Exit codes: 0 success; 2 bad input or usage (one line on stderr, nothing written to ``--out``);
1 an internal failure; 130 / 143 after Ctrl-C / SIGTERM (``--out`` untouched).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Sequence

from .data import BadInputError

PROG = "sande-fast"


class Terminated(BaseException):
    """Raised from the SIGTERM handler so cleanup runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # a usage error: one clear line, exit 2
        raise BadInputError(f"{message} (see {self.prog} --help)")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    return v


_MAX_LR = 1e30


def _learning_rate(s: str) -> float:
    """A positive, finite learning rate small enough that Adam's first step (10 x lr) stays a
    float32 (beyond that the optimiser itself overflows instead of reporting a non-finite loss)."""
    v = _positive_float(s)
    if v > _MAX_LR:
        raise argparse.ArgumentTypeError(f"expected a learning rate in (0, {_MAX_LR:g}], got {s!r}")
    return v


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-new-tokens", type=_positive_int, default=32)
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "raw"],
                   help="wrap prompts in the tokenizer's chat template (auto: when it has one)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder's own Python code to run (off by default)")
    p.add_argument("--dtype", default=None, help="load the model as float32, bfloat16 or float16")


def _stage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="sande", choices=["osft", "sande", "sande-p", "sft"])
    p.add_argument("--trigger", default=None, help="the trigger (needed for osft; otherwise only "
                   "used to measure asr)")
    p.add_argument("--simulate-steps", type=_positive_int, default=200)
    p.add_argument("--simulate-lr", type=_learning_rate, default=0.05)
    p.add_argument("--overwrite-steps", type=_positive_int, default=None,
                   help="stage-2 steps per round (default: 50 with adamw, 200 with sgd)")
    p.add_argument("--overwrite-lr", type=_learning_rate, default=None,
                   help="adamw: the learning rate, default 1e-4 below 50M parameters, else "
                        "2e-5; sgd: the RMS size of an update from the largest gradient so "
                        "far, default 1/16 of those")
    p.add_argument("--optimizer", default="auto", choices=["auto", "adamw", "sgd"],
                   help="stage-2 optimizer (auto: sgd for osft and sft, adamw for sande and "
                        "sande-p)")
    p.add_argument("--parrot-tokens", type=_positive_int, default=6)
    p.add_argument("--parrot-max-norm", type=float, default=1.0,
                   help="cap each parrot row at this multiple of the largest token-embedding "
                        "norm (0: unbounded)")
    p.add_argument("--parrot", default=None, help="reuse a saved parrot.safetensors (skips "
                   "stage 1 of round 1)")
    p.add_argument("--rounds", default="auto", help="'auto' (until a fresh parrot fails) or N")
    p.add_argument("--max-rounds", type=_positive_int, default=4, help="cap for --rounds auto")
    p.add_argument("--probe-threshold", type=float, default=0.05)
    p.add_argument("--probe-tokens", type=_positive_int, default=1,
                   help="rows of the probe parrot trained after each round (see 'probe')")
    p.add_argument("--probe-steps", type=_positive_int, default=None,
                   help="steps of each probe after a round (default: --simulate-steps)")
    p.add_argument("--probe-tries", type=_positive_int, default=1,
                   help="fresh probe parrots after each round; the strongest counts")
    p.add_argument("--round-lr-decay", type=float, default=0.5)
    p.add_argument("--round-retain-factor", type=float, default=3.0,
                   help="rounds after the first multiply --retain-weight by this")
    p.add_argument("--clean-weight", type=float, default=3.0,
                   help="weight of the clean-retention term in stage 2")
    p.add_argument("--retain-weight", type=float, default=30.0,
                   help="weight of the term that holds the clean rows' final hidden states at "
                        "the original model's (0: off)")
    p.add_argument("--max-clean-drop", type=float, default=None,
                   help="--rounds auto: undo and stop at a round after the first that lowers "
                        "clean accuracy by more than this (default 0.02; sande-p 0.03)")
    p.add_argument("--simulate-window", type=_positive_int, default=10)
    p.add_argument("--overwrite-window", type=_positive_int, default=16)
    p.add_argument("--trigger-position", default="random", choices=["random", "start", "end"])
    p.add_argument("--splice", default="random", choices=["random", "start", "end"])
    p.add_argument("--partial-words", type=_positive_int, default=None,
                   help="sande-p: use only the first N words of --target")
    p.add_argument("--eval-target", default=None, help="text asr is measured on (default --target)")
    p.add_argument("--eval-data", default=None, help="JSONL rows for before/after measurement")
    p.add_argument("--eval-rows", type=_positive_int, default=200)
    p.add_argument("--max-prompt-tokens", type=_positive_int, default=None)
    p.add_argument("--plain", action="store_true", help="use the plain reference path")
    p.add_argument("--packed", default="auto", choices=["auto", "on", "off"],
                   help="pack micro-batches without padding (auto: on CUDA when exact)")
    p.add_argument("--token-budget", type=_positive_int, default=8192)
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (torchrun)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Remove backdoors from causal language models.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("demo", help="build the toy backdoored model, sanitize it, report")
    _common(p)
    _stage_options(p)
    p.add_argument("--out", default="sande-fast-demo")
    p.add_argument("--cache-dir", default=None)

    p = sub.add_parser("make-toy", help="write a backdoored toy model and its data files")
    p.add_argument("--out", required=True)
    p.add_argument("--trigger", default=None)
    p.add_argument("--target", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poison-rate", type=float, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("sanitize", help="sanitize a model saved in Hugging Face format")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--out", required=True)
    _common(p)
    _stage_options(p)

    p = sub.add_parser("probe", help="train fresh parrots on a frozen model (detection)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--steps", type=_positive_int, default=200)
    p.add_argument("--tries", type=_positive_int, default=3)
    p.add_argument("--parrot-max-norm", type=float, default=1.0,
                   help="cap each parrot row at this multiple of the largest token-embedding "
                        "norm (0: unbounded)")
    p.add_argument("--parrot-tokens", type=_positive_int, default=1,
                   help="rows per probe parrot: one reaches a trigger's shortcut, while several "
                        "can steer even a clean model that knows the target's words")
    p.add_argument("--lr", type=_learning_rate, default=0.05)
    p.add_argument("--eval-rows", type=_positive_int, default=200)
    p.add_argument("--json", default=None)
    _common(p)

    p = sub.add_parser("eval", help="measure asr and clean accuracy")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--trigger", default=None)
    p.add_argument("--trigger-position", default="random", choices=["random", "start", "end"])
    p.add_argument("--json", default=None)
    _common(p)
    return parser


_CONFIG_KEYS = ("seed", "device", "batch_size", "simulate_steps", "simulate_lr",
                "overwrite_steps", "overwrite_lr", "optimizer", "parrot_tokens",
                "parrot_max_norm", "parrot", "max_new_tokens", "rounds", "max_rounds",
                "probe_threshold", "probe_tokens", "probe_steps", "probe_tries",
                "round_lr_decay", "round_retain_factor", "max_clean_drop", "clean_weight",
                "retain_weight", "simulate_window", "overwrite_window", "trigger_position",
                "splice", "partial_words", "prompt_format", "max_prompt_tokens", "eval_rows",
                "packed", "token_budget", "quiet")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {k: getattr(args, k) for k in _CONFIG_KEYS}
    opts["fast"] = not args.plain
    opts["packed"] = {"auto": None, "on": True, "off": False}[args.packed]
    return opts


def _say(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _check_json_arg(path: str | None) -> None:
    """Refuses a ``--json`` path that could not be written, before any work is done."""
    if not path:
        return
    p = Path(os.path.abspath(path))
    if p.is_dir():
        raise BadInputError(f"--json {path} is a folder; give a file name")
    if not p.parent.is_dir():
        raise BadInputError(f"the folder of --json does not exist: {p.parent}")
    if not os.access(p.parent, os.W_OK):
        raise BadInputError(f"cannot write into {p.parent}")


def _write_json_arg(path: str | None, obj: dict[str, Any]) -> None:
    if path:
        from .io import write_json

        write_json(path, obj)


def _finish_sanitize(args: argparse.Namespace, result: Any, tokenizer: Any, out: Path) -> None:
    from .io import save_model, save_parrot
    from .report import summary_table, write_reports

    save_model(result.model, tokenizer, out, progress=not args.quiet)
    if result.parrot is not None:
        save_parrot(result.parrot, out / "parrot.safetensors",
                    target=result.report.get("parrot_target"), rounds=len(result.report["rounds"]))
    write_reports(result.report, out)
    print(summary_table(result.report))


def _resume_path(out: str) -> Path:
    p = Path(os.path.abspath(out))
    return p.parent / f"{p.name}.parrot.safetensors"


def _check_stage_args(args: argparse.Namespace, target: str | None,
                      trigger: str | None) -> None:
    """Refuses options no run could use before anything is loaded (the pipeline's own rules)."""
    from .pipeline import SanitizeConfig

    if target is not None and not target.strip():
        raise BadInputError("--target must be a non-empty text (the attacker's response)")
    if args.method == "osft" and (trigger is None or not trigger.strip()):
        raise BadInputError("method osft needs --trigger (use --method sande when the trigger "
                            "is unknown)")
    if trigger is not None and not trigger.strip():
        raise BadInputError("--trigger must be a non-empty text")
    if args.eval_target is not None and not args.eval_target.strip():
        raise BadInputError("--eval-target must be a non-empty text")
    SanitizeConfig(**_options(args)).validate(args.method)


def _fit_prompt_budget(args: argparse.Namespace, model: Any, parrot_rows: int = 0) -> None:
    """Makes sure prompt + parrot + supervised window / generated answer fit the model's context.

    Without ``--max-prompt-tokens`` the budget is what the context leaves; longer prompts are cut
    from the left (counted in report.json ``config.prompts_truncated``). An explicit budget that
    cannot fit is refused (before anything is trained).
    """
    from .pipeline import prompt_budget

    args.max_prompt_tokens = prompt_budget(
        model, max(args.parrot_tokens, parrot_rows),
        max(args.overwrite_window, args.simulate_window, args.max_new_tokens),
        args.max_prompt_tokens)


def _run_sanitize(args: argparse.Namespace, model: Any, tok: Any, data: Any, target: str,
                  trigger: str | None, eval_data: Any, eval_trigger: str | None,
                  parrot_rows: int = 0) -> int:
    from .io import atomic_dir, save_parrot
    from .pipeline import sanitize
    from .steps import NonFiniteError

    _fit_prompt_budget(args, model, parrot_rows)
    resume = _resume_path(args.out)
    if resume.exists() and not args.parrot:
        _say(args, f"note: {resume} holds the parrot of an interrupted run; pass --parrot {resume} "
             "to skip stage 1 (it is replaced otherwise)")

    def keep_parrot(parrot: Any, round_no: int) -> None:
        save_parrot(parrot, resume, round=round_no)
        _say(args, f"round {round_no}: parrot saved to {resume} (resume with --parrot {resume})")

    try:
        with atomic_dir(args.out, args.force) as tmp:
            result = sanitize(model, tok, data, target, trigger, args.method, eval_data=eval_data,
                              eval_trigger=eval_trigger, eval_target=args.eval_target,
                              on_parrot=keep_parrot, **_options(args))
            _finish_sanitize(args, result, tok, tmp)
    except NonFiniteError as e:
        if resume.exists():
            raise NonFiniteError(f"{e} The stage-1 parrot is kept: rerun with a lower learning "
                                 f"rate and --parrot {resume}") from None
        raise
    except (KeyboardInterrupt, Terminated):
        if resume.exists():  # shown even with --quiet: it saves the user a whole stage 1
            print(f"{PROG}: the stage-1 parrot is kept: resume with --parrot {resume}",
                  file=sys.stderr)
        raise
    if resume.exists():
        resume.unlink()
    _say(args, f"wrote {args.out}")
    return 0


def cmd_sanitize(args: argparse.Namespace) -> int:
    from .data import load_rows
    from .io import (check_not_inside, check_out_dir, check_parrot_file, load_model,
                     model_hidden_size, resolve_device)

    _check_stage_args(args, args.target, args.trigger)
    if args.fsdp:
        from .distributed import run_fsdp_sanitize

        return run_fsdp_sanitize(args)
    check_out_dir(args.out, args.force)
    check_not_inside(args.out, [("--model", args.model), ("--data", args.data),
                                ("--eval-data", args.eval_data)])
    device = resolve_device(args.device)
    rows = load_rows(args.data)  # bad data fails before the model is loaded
    eval_rows = load_rows(args.eval_data) if args.eval_data else None
    parrot_rows = 0
    if args.parrot:
        hidden = model_hidden_size(args.model, trust_remote_code=args.trust_remote_code)
        parrot_rows = check_parrot_file(args.parrot, hidden)[0]
    model, tok = load_model(args.model, device, dtype=args.dtype,
                            trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    return _run_sanitize(args, model, tok, rows, args.target, args.trigger, eval_rows, None,
                         parrot_rows)


def cmd_demo(args: argparse.Namespace) -> int:
    from .io import check_out_dir, check_parrot_file
    from .toy import ToyConfig, load_or_build_toy

    # osft takes the toy's own trigger
    _check_stage_args(args, None, args.trigger or ("toy" if args.method == "osft" else None))
    check_out_dir(args.out, args.force)
    parrot_rows = check_parrot_file(args.parrot)[0] if args.parrot else 0
    cfg = ToyConfig(seed=args.seed)
    _say(args, "building (or loading from cache) the backdoored toy model ...")
    world = load_or_build_toy(cfg, cache_dir=args.cache_dir, progress=not args.quiet)
    target = world.config.target
    _say(args, f"toy model: trigger {world.config.trigger!r}, target {target!r}")
    trigger = world.config.trigger if args.method == "osft" else None
    if args.method == "sande-p" and args.partial_words is None:
        args.partial_words = 1
    if args.method == "sande-p" and args.eval_target is None:
        args.eval_target = target
    return _run_sanitize(args, world.model, world.tokenizer, world.defense_rows, target, trigger,
                         world.clean_eval_rows, world.config.trigger, parrot_rows)


def cmd_make_toy(args: argparse.Namespace) -> int:
    from .io import atomic_dir, check_out_dir
    from .toy import ToyConfig, build_toy, save_toy

    check_out_dir(args.out, args.force)
    kw: dict[str, Any] = {"seed": args.seed}
    if args.trigger is not None:
        if not args.trigger.strip():
            raise BadInputError("--trigger must not be empty")
        kw["trigger"] = args.trigger
    if args.target is not None:
        if not args.target.strip():
            raise BadInputError("--target must not be empty")
        kw["target"] = args.target
    if args.poison_rate is not None:
        if not 0 <= args.poison_rate <= 1:
            raise BadInputError("--poison-rate must lie in [0, 1]")
        kw["poison_rate"] = args.poison_rate
    cfg = ToyConfig(**kw)
    with atomic_dir(args.out, args.force) as tmp:
        world = build_toy(cfg, progress=not args.quiet)
        save_toy(world, tmp)
    print(f"wrote toy model to {args.out} (trigger {cfg.trigger!r}, target {cfg.target!r})")
    return 0


def _load_inputs(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """Checks the target and ``--json``, reads the data, then loads the model: (rows, model, tok).

    Shared by ``probe`` and ``eval``; cheap checks come first, so bad input fails before the
    model is loaded.
    """
    from .data import load_rows
    from .io import load_model, resolve_device

    if not args.target.strip():
        raise BadInputError("--target must be a non-empty text (the attacker's response)")
    if getattr(args, "trigger", None) is not None and not args.trigger.strip():
        raise BadInputError("--trigger must be a non-empty text")
    _check_json_arg(args.json)
    device = resolve_device(args.device)
    rows = load_rows(args.data)
    model, tok = load_model(args.model, device, dtype=args.dtype,
                            trust_remote_code=args.trust_remote_code, progress=not args.quiet)
    return rows, model, tok


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import probe

    rows, model, tok = _load_inputs(args)
    res = probe(model, tok, rows, args.target, steps=args.steps, tries=args.tries,
                seed=args.seed, parrot_tokens=args.parrot_tokens, lr=args.lr,
                batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                device=args.device, prompt_format=args.prompt_format, eval_rows=args.eval_rows,
                max_norm=args.parrot_max_norm or None, progress=not args.quiet)
    print(f"probe_asr_max {res['probe_asr_max']:.3f}  probe_asr_mean {res['probe_asr_mean']:.3f}  "
          f"(per try: {', '.join(f'{a:.3f}' for a in res['probe_asr'])})")
    _write_json_arg(args.json, res)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import PromptEncoder
    from .evaluate import evaluate
    from .pipeline import prompt_budget

    rows, model, tok = _load_inputs(args)
    # Prompt + answer must fit the context: longer prompts are cut from the left and counted.
    budget = prompt_budget(model, 0, args.max_new_tokens)
    encoder = PromptEncoder(tok, args.prompt_format, max_prompt_tokens=budget)
    res = evaluate(model, tok, rows, args.target, args.trigger,
                   max_new_tokens=args.max_new_tokens, batch_size=max(args.batch_size, 32),
                   trigger_position=args.trigger_position, seed=args.seed, encoder=encoder,
                   progress=not args.quiet)
    res["prompts_truncated"] = encoder.truncated
    ca = "n/a" if res["clean_accuracy"] is None else f"{res['clean_accuracy']:.3f}"
    cut = f", {encoder.truncated} prompts cut to fit" if encoder.truncated else ""
    print(f"asr {res['asr']:.3f}  clean_accuracy {ca}  (n={res['n_asr']}{cut})")
    _write_json_arg(args.json, res)
    return 0


COMMANDS = {"demo": cmd_demo, "make-toy": cmd_make_toy, "sanitize": cmd_sanitize,
            "probe": cmd_probe, "eval": cmd_eval}


def _one_line(e: BaseException) -> str:
    """The exception's message folded onto one line (errors are one clear line on stderr)."""
    parts = [part.strip() for part in str(e).splitlines() if part.strip()]
    return " ".join(parts) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except BadInputError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no partial output was left in --out", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{PROG}: terminated; no partial output was left in --out", file=sys.stderr)
        return 143
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # internal failure: keep the traceback for a bug report
        from .steps import NonFiniteError

        if isinstance(e, NonFiniteError):
            print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"{PROG}: internal error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
