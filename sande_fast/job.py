"""A sanitize job as the command line runs it: check the inputs, load, run the recipe, write
``--out`` atomically. The same steps run in one process and on every FSDP rank; a *world*
(:class:`Local` here, :class:`~sande_fast.distributed.Sharded` under ``--fsdp``) says who
writes, how the ranks agree, and how the model is gathered and saved.

Output rules: ``--out`` is claimed before any work (no second run can take it, and ``--force``
replaces only an earlier output of this tool, never an input); nothing is written into it until
the run has succeeded. The stage-1 parrot of each round is kept in a resume folder meanwhile
(:func:`sande_fast.io.resume_dir`), so an interrupted or failed run can resume with ``--parrot``;
it is removed on success.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import BadInputError, Terminated
from . import io
from .io import atomic_dir, claim_out_dir, discard_resume, resume_parrot_path, save_parrot
from .options import SanitizeConfig
from .recipe import SanitizeResult, sanitize
from .report import summary_table, write_reports
from .steps import NonFiniteError

__all__ = ["SanitizeJob", "Local", "Loaded", "run_job", "say", "write_output"]

_LOG = logging.getLogger(__name__)


@dataclass
class Loaded:
    """What a job trains on: the model, its tokenizer and the rows."""

    model: Any
    tokenizer: Any
    rows: Any
    eval_rows: Any = None


@dataclass
class SanitizeJob:
    """One ``sanitize`` (or ``demo``) run from the command line.

    Attributes:
        out: the output folder.
        force: replace an existing ``out`` written by an earlier run.
        method, target, trigger, eval_target, eval_trigger: as in :func:`~sande_fast.sanitize`.
        config: the options.
        load: checks the inputs and loads them, given the world (its ``load_device`` is the
            CPU under FSDP, where each rank's shards move to its device; None: the run's
            device). Raises :class:`BadInputError` for bad input.
        inputs: the run's input paths as ``(flag, path)``: ``out`` may not hold or replace
            any of them.
        after_save: called on the writer with the temporary output folder and the report once
            the model is saved there, before the reports are written (``--save-patch``).
    """

    out: str
    force: bool
    method: str
    target: str
    config: SanitizeConfig
    load: Callable[[Any], Loaded]
    trigger: str | None = None
    eval_target: str | None = None
    eval_trigger: str | None = None
    inputs: tuple[tuple[str, Any], ...] = ()
    after_save: Callable[[Path, dict[str, Any]], None] | None = None


class Local:
    """One process: it writes everything itself."""

    writer = True
    fsdp = False
    mixed_precision = False
    load_device: torch.device | None = None  # the run's device

    def agree(self, error: str | None) -> None:
        if error:
            raise BadInputError(error)

    def gather(self, model: Any) -> Any:
        return None

    def save_model(self, model: Any, tokenizer: Any, out: Path, state: Any,
                   progress: bool) -> None:
        io.save_model(model, tokenizer, out, progress=progress)

    def confirm(self, ok: bool) -> bool:
        return ok


def say(quiet: bool, msg: str) -> None:
    """A note of the run, logged at info: on stderr unless ``quiet`` (which the command line's
    handler applies itself), and in a ``--log-file`` either way."""
    _LOG.info("%s", msg)


def write_output(world: Any, result: SanitizeResult, tokenizer: Any, tmp: Path, state: Any,
                 progress: bool,
                 after_save: Callable[[Path, dict[str, Any]], None] | None = None) -> None:
    """The model (under ``--train lora``: the PEFT adapter), the parrot (sande / sande-p) and
    the reports, into ``tmp``."""
    from .lora import lora_layers, save_adapter

    t = time.perf_counter()
    if lora_layers(result.model):
        save_adapter(result.model, tmp, tokenizer)  # one process only (recipe refuses --fsdp)
    else:
        world.save_model(result.model, tokenizer, tmp, state, progress)
    result.report["timing"]["stages"]["save_s"] = time.perf_counter() - t
    if after_save is not None:
        after_save(tmp, result.report)
    if result.parrot is not None:
        save_parrot(result.parrot, tmp / "parrot.safetensors",
                    target=result.report.get("parrot_target"), rounds=len(result.report["rounds"]))
    # Several targets: target k's last parrot in parrot_k.safetensors (k >= 2; the first
    # target's is parrot.safetensors), named in the report's per-target entries.
    for k, entry in enumerate(result.report.get("targets") or []):
        parrot = result.target_parrots[k] if k < len(result.target_parrots) else None
        if k and parrot is not None:
            entry["parrot_file"] = f"parrot_{k + 1}.safetensors"
            save_parrot(parrot, tmp / entry["parrot_file"], target=entry.get("parrot_target"),
                        rounds=len(result.report["rounds"]))
        elif parrot is not None:
            entry["parrot_file"] = "parrot.safetensors"
    write_reports(result.report, tmp)


def run_job(job: SanitizeJob, world: Any = None) -> int:
    """Runs ``job``; returns the exit code (0). Every rank of an FSDP job calls this.

    A usage error found on any rank stops every rank with the same message; a failure on any
    rank leaves ``out`` untouched.
    """
    world = world or Local()
    quiet = job.config.quiet
    with contextlib.ExitStack() as output:
        error = None
        tmp = None
        load_s = 0.0
        try:
            if world.writer:  # --out lives on the writer's machine; claimed until the result is in
                claim_out_dir(job.out, job.force, job.inputs)
                if not world.fsdp:
                    tmp = output.enter_context(atomic_dir(job.out, job.force, job.inputs))
            t_load = time.perf_counter()
            loaded = job.load(world)
            load_s = time.perf_counter() - t_load
        except BadInputError as e:
            error = str(e)
        world.agree(error)
        result = _sanitize(job, world, loaded)
        # Loading happens before the recipe starts its clock: the report's phases add it.
        result.report["timing"]["stages"] = {"load_s": load_s,
                                             **result.report["timing"]["stages"]}
        state = world.gather(result.model)
        if not world.writer:
            # The writer renames the output only when this says every rank got here.
            if not world.confirm(True):
                raise RuntimeError("rank 0 could not write --out; it was left untouched")
            return 0
        if tmp is None:
            # A sharded writer makes its temporary folder only now: while the ranks train, one
            # that fails can leave it blocked in a collective until torchrun kills it.
            try:
                tmp = output.enter_context(atomic_dir(job.out, job.force, job.inputs))
            except BaseException:
                world.confirm(False)  # the other ranks wait to hear
                raise
        failure: BaseException | None = None
        try:
            write_output(world, result, loaded.tokenizer, tmp, state, not quiet,
                         after_save=job.after_save)
        except Exception as e:  # tell the other ranks before leaving
            failure = e
        if not world.confirm(failure is None):
            raise failure or RuntimeError("another rank failed; --out was left untouched")
    discard_resume(job.out)
    print(summary_table(result.report))
    say(quiet, f"wrote {job.out}")
    return 0


def _sanitize(job: SanitizeJob, world: Any, loaded: Loaded) -> SanitizeResult:
    """The recipe, with each round's parrot kept for a resume and the way to resume told."""
    quiet = job.config.quiet
    resume = resume_parrot_path(job.out)
    if world.writer and resume.exists() and not job.config.parrot:
        say(quiet, f"note: {resume} holds the parrot of an interrupted run; pass --parrot "
                   f"{resume} to skip stage 1 (it is replaced otherwise)")

    def keep_parrot(parrot: torch.Tensor, round_no: int) -> None:
        if world.writer:
            save_parrot(parrot, resume, round=round_no)
            say(quiet, f"round {round_no}: parrot saved to {resume} (resume with --parrot "
                       f"{resume})")

    try:
        return sanitize(loaded.model, loaded.tokenizer, loaded.rows, job.target, job.trigger,
                        job.method, config=job.config, eval_data=loaded.eval_rows,
                        eval_trigger=job.eval_trigger, eval_target=job.eval_target,
                        on_parrot=keep_parrot, fsdp=world.fsdp,
                        mixed_precision=world.mixed_precision)
    except NonFiniteError as e:
        if resume.exists():
            raise NonFiniteError(f"{e} The stage-1 parrot is kept in {resume.parent}: rerun "
                                 f"with a lower learning rate and --parrot {resume}") from None
        raise
    except (KeyboardInterrupt, Terminated):
        if resume.exists():  # shown even with --quiet: it saves the user a whole stage 1
            _LOG.warning("the stage-1 parrot is kept in %s: resume with --parrot %s",
                         resume.parent, resume, extra={"always": True, "tag": ""})
        raise
