"""Messages: the ``sande_fast`` logger, the command line's handlers, and third-party warnings.

The library only logs, through ``logging.getLogger("sande_fast.<module>")``, and adds no
handler: an application that embeds it decides where the messages go. The command line calls
:func:`cli_logging`, which writes them to stderr (and to ``--log-file``):

* on stderr, as the tool always wrote them: notes plain, then ``sande-fast: warning: ...`` and
  ``sande-fast: error: ...``; ``--quiet`` leaves only the errors;
* in the log file, every message at ``--log-level`` with time, level and logger, tracebacks
  included, and the run's inputs and options at the top (:func:`log_run`).

Warnings of Python's ``warnings`` module and of transformers' logger reach the same handlers as
one line each (:func:`route_warnings`, :func:`hf_quiet`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from .errors import PROG, BadInputError

__all__ = ["LOGGER", "CONFIG_LOGGER", "LEVELS", "cli_logging", "CliLogging", "log_run", "route_warnings",
           "hf_quiet", "fold_lines"]

LOGGER = "sande_fast"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
# The run's inputs and options: always at the top of a log file (even at --log-level warning,
# a log that does not say what ran is of little use), on stderr only at --log-level debug.
CONFIG_LOGGER = LOGGER + ".config"

_FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def fold_lines(text: str, limit: int = 400) -> str:
    """A message folded onto one line (lines joined by ' '), cut to ``limit`` characters."""
    parts = [part.strip() for part in _ANSI.sub("", str(text)).splitlines() if part.strip()]
    s = " ".join(parts)
    return s if len(s) <= limit else s[:limit - 3].rstrip() + "..."


# ------------------------------------------------------------------------------ handlers

class _TerminalFormatter(logging.Formatter):
    """The stderr lines. A record may set ``tag`` (``extra={"tag": ...}``) to replace the level
    word: ``"internal error"``, or ``""`` for a status line (``sande-fast: interrupted; ...``).
    Tracebacks are left out: the command prints its own, and the log file keeps them."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        tag = getattr(record, "tag", None)
        if tag is None:
            if record.levelno < logging.WARNING:
                return msg if record.levelno >= logging.INFO else f"{PROG}: debug: {msg}"
            tag = "error" if record.levelno >= logging.ERROR else "warning"
        return f"{PROG}: {tag}: {msg}" if tag else f"{PROG}: {msg}"


class _TerminalHandler(logging.StreamHandler):
    """Writes through ``tqdm.write``, which lifts the progress bars above the line instead of
    cutting them in two."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # as logging's own handlers do: a failed message never stops a run
            self.handleError(record)


class CliLogging:
    """The command line's handlers on the ``sande_fast`` logger (see :func:`cli_logging`)."""

    def __init__(self) -> None:
        self.logger = logging.getLogger(LOGGER)
        self.terminal = _TerminalHandler(sys.stderr)
        self.terminal.setFormatter(_TerminalFormatter())
        self.terminal.addFilter(self._terminal_filter)
        self.file: logging.FileHandler | None = None
        self.level = logging.INFO
        self.quiet = False

    def _terminal_filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "always", False):  # e.g. how to resume, after an interruption
            return True
        if record.name == CONFIG_LOGGER and self.level > logging.DEBUG:
            return False
        return record.levelno >= (logging.ERROR if self.quiet else self.level)

    def configure(self, level: str = "info", log_file: str | os.PathLike | None = None, *,
                  quiet: bool = False, protect: Iterable[tuple[str, Any]] = (),
                  out: str | os.PathLike | None = None) -> None:
        """Applies ``--log-level``, ``--quiet`` and ``--log-file``.

        Args:
            level: ``debug``, ``info``, ``warning`` or ``error``.
            log_file: a file the log is appended to (created when missing).
            quiet: only errors on stderr (the log file still gets every message).
            protect: the run's inputs as ``(option, path)``: the log never writes into one.
            out: the run's output folder: the log may not lie inside it (the folder is
                replaced when the run succeeds, and must be empty or the tool's to begin with).

        Raises:
            BadInputError: an unknown level, or a log file that cannot be written there.
        """
        if level not in LEVELS:
            raise BadInputError(f"--log-level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.level, self.quiet = LEVELS[level], quiet
        self.logger.setLevel(self.level)
        logging.getLogger(CONFIG_LOGGER).setLevel(min(self.level, logging.INFO))
        if os.environ.get("RANK", "0") != "0":
            # Another rank of a torchrun job: rank 0's log is the run's; this one's warnings and
            # errors still reach its stderr.
            self.level = max(self.level, logging.WARNING)
            return
        if log_file is not None:
            path = _check_log_file(log_file, protect, out)
            try:
                handler = logging.FileHandler(path, mode="a", encoding="utf-8")
            except OSError as e:
                raise BadInputError(f"cannot write --log-file {log_file}: "
                                    f"{e.strerror or e}") from None
            handler.setFormatter(logging.Formatter(_FILE_FORMAT))
            self.logger.addHandler(handler)
            self.file = handler

    def close(self) -> None:
        for handler in (self.terminal, self.file):
            if handler is not None:
                self.logger.removeHandler(handler)
                handler.close()


@contextlib.contextmanager
def cli_logging() -> Iterator[CliLogging]:
    """The ``sande_fast`` logger writes to stderr (at ``info`` until :meth:`CliLogging.configure`
    is called) for the length of a command; the logger's settings come back afterwards.

    It does not propagate to the root logger meanwhile: a handler there (a host program's, or
    pytest's) would print every message a second time."""
    logs = CliLogging()
    logger = logs.logger
    saved = (logger.level, logger.propagate, logging.getLogger(CONFIG_LOGGER).level)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(logs.terminal)
    try:
        yield logs
    finally:
        logs.close()
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logging.getLogger(CONFIG_LOGGER).setLevel(saved[2])


def _check_log_file(log_file: str | os.PathLike, protect: Iterable[tuple[str, Any]],
                    out: str | os.PathLike | None) -> Path:
    """The log file's path, refused when it would write into an input or inside ``out``."""
    path = Path(os.path.abspath(os.fspath(log_file)))
    if str(log_file) == "" or path.is_dir():
        raise BadInputError(f"--log-file {log_file} is a folder; give a file name")
    real = Path(os.path.realpath(path))
    for option, given in protect:
        if given is None or os.fspath(given) == "":
            continue
        inp = Path(os.path.realpath(os.fspath(given)))
        if real == inp or inp in real.parents:
            raise BadInputError(f"--log-file {log_file} would write into the {option} input "
                                f"{given}")
    if out is not None and os.fspath(out):
        o = Path(os.path.realpath(os.fspath(out)))
        if real == o or o in real.parents:
            raise BadInputError(f"--log-file {log_file} lies inside --out {out}, which is "
                                "replaced when the run succeeds; put the log next to it")
    return path


def log_run(command: str, inputs: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """The head of the log: the command, its inputs and every option as the run uses it (the
    ``config`` line is a JSON object that ``--config FILE`` takes back)."""
    from .version import __version__

    log = logging.getLogger(CONFIG_LOGGER)
    log.info("%s %s %s (python %s)", PROG, __version__, command, sys.version.split()[0])
    log.info("inputs: %s", json.dumps(dict(inputs), default=str, ensure_ascii=False))
    log.info("config: %s", json.dumps(dict(config), default=str, ensure_ascii=False))


# ------------------------------------------------------------------------------ warnings

_WARN_LOG = logging.getLogger(LOGGER + ".warnings")
_HF_LOG = logging.getLogger(LOGGER + ".transformers")


def _transformers_logger() -> logging.Logger:
    """transformers' library logger (it has its own stderr handler and does not propagate)."""
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger()  # makes sure its handler is set up, so we can take it off
    return logging.getLogger("transformers")


class _Forward(logging.Handler):
    """Passes transformers' records on to ``sande_fast.transformers`` as one line each; held
    instead while ``hold`` is a list."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: list[logging.LogRecord] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.hold is not None:
            self.hold.append(record)
        else:
            _pass_on(record)


def _pass_on(record: logging.LogRecord) -> None:
    _HF_LOG.log(record.levelno, "transformers: %s", fold_lines(record.getMessage(), 300))


@contextlib.contextmanager
def _transformers_to(handler: logging.Handler) -> Iterator[None]:
    lib = _transformers_logger()
    saved = lib.handlers[:]
    lib.handlers = [handler]
    try:
        yield
    finally:
        lib.handlers = saved


@contextlib.contextmanager
def route_warnings(quiet: bool = False) -> Iterator[None]:
    """Third-party warnings (Python's ``warnings`` and transformers' logger) go through the
    ``sande_fast`` logger as one line each (``sande-fast: warning: ...`` on stderr).

    ``quiet`` is kept for callers: with ``--quiet`` the command line's stderr handler shows only
    errors, while a log file still receives the warnings."""
    shown_before = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        _WARN_LOG.warning("%s: %s", category.__name__, fold_lines(str(message), 300))

    warnings.showwarning = show
    try:
        with _transformers_to(_Forward()):
            yield
    finally:
        warnings.showwarning = shown_before


@contextlib.contextmanager
def hf_quiet(progress: bool = True, drop: Sequence[str] = ()) -> Iterator[None]:
    """Holds transformers' messages while the caller loads or saves; unless ``progress``, also
    its progress bars.

    The held messages are passed on (one line each) when the block succeeds, and dropped when it
    raises: the caller's own error says what went wrong, and a warning printed before it (a
    load report before "the weights do not match") would only mislead. ``drop`` lists patterns
    (regular expressions, searched in the message) of messages the caller reports better
    itself; each caller says why next to its patterns.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    holder = _Forward()
    holder.hold = []
    try:
        with _transformers_to(holder):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    patterns = [re.compile(p) for p in drop]
    for record in holder.hold:
        if not any(p.search(_ANSI.sub("", record.getMessage())) for p in patterns):
            _pass_on(record)
