"""Data: rows from files (JSONL, JSON, Parquet, Arrow), trigger insertion and prompt/response
tokenisation.

Every stage of the toolkit sees a prompt the same way: the user's text is wrapped by the
tokenizer's chat template when it has one (else used raw), and tokenised piece by piece so that
the token span of the user's own text is known. Parrot splice positions and trigger insertion are
drawn inside that span, because a real trigger sits inside the user's text, never in the template.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from .errors import BadInputError

__all__ = [
    "BadInputError",
    "Row",
    "EncodedPrompt",
    "PromptEncoder",
    "read_jsonl",
    "read_rows",
    "read_dataset",
    "load_rows",
    "write_jsonl",
    "insert_trigger",
    "TRIGGER_POSITIONS",
    "ROLES",
    "DATASET_FORMATS",
    "MAX_LINE_BYTES",
    "MAX_ROWS",
    "MAX_SEED",
    "check_seed",
    "text_list",
    "MAX_TEXT_CHARS",
    "model_stop_ids",
    "check_model_and_tokenizer",
    "check_target_fits",
    "check_run_bounds",
]

MAX_LINE_BYTES = 4 * 2**20
"""Longest JSONL line read (bytes); a longer one is refused with its line number."""
MAX_ROWS = 1_000_000
"""Most rows one data file may hold."""
MAX_SEED = 2**32 - 1
"""Largest ``--seed`` (numpy's limit; the stages add small offsets to it)."""

TRIGGER_POSITIONS = ("random", "start", "end")
_SENTINEL = "\u2063SANDEFASTPROMPT\u2063"


ROLES = ("system", "user", "assistant")
"""The roles a conversation turn may have."""

Turn = tuple[str, str]
"""One conversation turn: ``(role, content)``."""


@dataclass(frozen=True)
class Row:
    """One data row: a prompt and, optionally, its reference (clean) response.

    Attributes:
        prompt: the user's text: of a conversation, its last user turn (the trigger goes there).
        response: the reference answer, or None (the model's own answer is then used).
        context: of a conversation, the turns before the last user turn (a system message
            first, when given), as ``(role, content)`` pairs; empty for a single-turn row.
    """

    prompt: str
    response: str | None = None
    context: tuple[Turn, ...] = ()

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat messages: the context, the user turn, then the response
        (when given) as an assistant turn."""
        turns = [*self.context, ("user", self.prompt)]
        if self.response is not None:
            turns.append(("assistant", self.response))
        return [{"role": r, "content": c} for r, c in turns]


def read_jsonl(path: Union[str, os.PathLike], prompt_key: str = "prompt",
               response_key: str = "response") -> list[Row]:
    """Reads a JSONL file of ``{"prompt": ..., "response": ...}`` objects.

    Args:
        path: file to read; blank lines are skipped.
        prompt_key: the key read as the prompt (``--prompt-key``).
        response_key: the key read as the response (``--response-key``); with the default,
            TRL's ``completion`` is read as the response too.

    Returns:
        The rows, in file order.

    Raises:
        BadInputError: the file is missing, unreadable, not UTF-8, empty, or a line is not a JSON
            object with a string ``prompt`` (the message names the line).
    """
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"data file not found: {p}")
    if not p.is_file():
        raise BadInputError(f"data path is not a file: {p}")
    rows: list[Row] = []
    for lineno, line in _lines(p):
        if not line.strip():
            continue
        if len(rows) >= MAX_ROWS:
            raise BadInputError(f"{p} holds more than {MAX_ROWS} rows; use a sample of it")
        try:
            obj = json.loads(line)
        except RecursionError:
            raise BadInputError(f"{p}:{lineno}: malformed JSON (nested too deeply)") from None
        except ValueError as e:  # JSONDecodeError, or an integer too long to convert
            msg = getattr(e, "msg", None) or _first_line(e)
            raise BadInputError(f"{p}:{lineno}: malformed JSON ({msg})") from None
        rows.append(_row_from_obj(obj, f"{p}:{lineno}", prompt_key, response_key))
    if not rows:
        raise BadInputError(f"data file {p} has no rows (expected JSONL with a 'prompt' per line)")
    return rows


def _lines(p: Path) -> Iterable[tuple[int, str]]:
    """``(line number, text)`` of each line, read one at a time and at most
    :data:`MAX_LINE_BYTES` each (a hostile file cannot make the reader hold it whole)."""
    try:
        f = open(p, "rb")
    except OSError as e:
        raise BadInputError(f"cannot read data file {p}: {e.strerror or e}") from None
    with f:
        # Lines end at "\n" only: str.splitlines() would also split at U+2028, form feeds etc.,
        # which JSON allows inside strings, and would make line numbers disagree with editors.
        for lineno in range(1, 2**62):
            try:
                raw = f.readline(MAX_LINE_BYTES + 1)
            except OSError as e:
                raise BadInputError(f"cannot read data file {p}: {e.strerror or e}") from None
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise BadInputError(f"{p}:{lineno}: line longer than {_size(MAX_LINE_BYTES)} "
                                    "(the limit per row); shorten it (a prompt is cut to the "
                                    "model's context anyway)")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a leading byte-order mark is tolerated
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInputError(f"{p}:{lineno}: not valid UTF-8 text") from None
            yield lineno, text.rstrip("\n").rstrip("\r")


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 and n % 2**20 == 0 else f"{n} bytes"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_text(value: str, what: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError(f"{where}: {what} holds an unpaired surrogate escape (\\ud800-"
                            "\\udfff); fix the text") from None


# The keys a data row may hold: TRL's standard prompt/completion format names the answer
# "completion"; a conversation is one "messages" list. Any other key is refused: a key the tool
# does not read (a misspelt "respones") would silently train toward the model's own answer
# instead of the user's.
ROW_KEYS = ("prompt", "response", "completion", "messages")
MESSAGE_KEYS = ("role", "content")


def _row_from_obj(obj: Any, where: str, prompt_key: str = "prompt",
                  response_key: str = "response") -> Row:
    if not isinstance(obj, dict):
        raise BadInputError(f"{where}: expected a JSON object with a {prompt_key!r} key")
    if "messages" in obj and prompt_key != "messages":
        others = [k for k in obj if k != "messages"]
        if others:
            raise BadInputError(f"{where}: unknown key {others[0]!r}; a conversation row holds "
                                "only 'messages'")
        return _row_from_messages(obj["messages"], where)
    answer_keys = [response_key] + (["completion"] if response_key == "response" else [])
    unknown = [k for k in obj if k != prompt_key and k not in answer_keys]
    if unknown:
        raise BadInputError(f"{where}: unknown key {unknown[0]!r}; a row holds {prompt_key!r} "
                            f"and optionally {' or '.join(map(repr, answer_keys))}, or only "
                            "'messages' (--prompt-key / --response-key read other names)")
    given = [k for k in answer_keys if k in obj]
    if len(given) > 1:
        raise BadInputError(f"{where}: row has both 'response' and 'completion'; keep one")
    prompt = obj.get(prompt_key)
    context: tuple[Turn, ...] = ()
    if isinstance(prompt, list):  # TRL's conversational prompt: messages ending with the user's
        turns = _turns(prompt, where, repr(prompt_key))
        if turns[-1][0] != "user":
            raise BadInputError(f"{where}: {prompt_key!r} must end with a user turn (the answer "
                                "goes in 'completion')")
        context, prompt = tuple(turns[:-1]), turns[-1][1]
    elif not isinstance(prompt, str):
        what = (f"has no {prompt_key!r}" if prompt is None
                else f"has a {prompt_key!r} that is not a string or a list of messages")
        raise BadInputError(f"{where}: row {what}")
    if not prompt.strip():
        raise BadInputError(f"{where}: row has an empty {prompt_key!r}")
    _check_text(prompt, repr(prompt_key), where)
    response = obj.get(given[0]) if given else None
    if isinstance(response, list):  # TRL's conversational completion: one assistant message
        turns = _turns(response, where, repr(given[0]))
        if len(turns) != 1 or turns[0][0] != "assistant":
            raise BadInputError(f"{where}: {given[0]!r} must hold exactly one assistant "
                                "message")
        response = turns[0][1]
    elif response is not None and not isinstance(response, str):
        raise BadInputError(f"{where}: {given[0]!r} must be a string or a list with one "
                            "assistant message when present")
    if response is not None:
        _check_text(response, repr(given[0]), where)
    return Row(prompt=prompt, response=response, context=context)


def _row_from_messages(messages: Any, where: str) -> Row:
    """A ``messages`` conversation: its last user turn is the prompt, an assistant turn after it
    the response (none: the model's own answer is used), the turns before it the context."""
    turns = _turns(messages, where, "'messages'")
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    if not users:
        raise BadInputError(f"{where}: 'messages' has no user turn")
    u = users[-1]
    after = turns[u + 1:]
    if len(after) > 1 or (after and after[0][0] != "assistant"):
        raise BadInputError(f"{where}: 'messages' must end with a user turn, or with one "
                            "assistant turn after the last user turn (the response)")
    prompt = turns[u][1]
    if not prompt.strip():
        raise BadInputError(f"{where}: the last user turn of 'messages' is empty")
    return Row(prompt=prompt, response=after[0][1] if after else None,
               context=tuple(turns[:u]))


def _turns(value: Any, where: str, what: str) -> list[Turn]:
    """Validated ``(role, content)`` pairs of a list of chat messages; a system message may only
    come first (chat templates place it there, some refuse it elsewhere)."""
    if not isinstance(value, list) or not value:
        raise BadInputError(f"{where}: {what} must be a non-empty list of "
                            "{'role', 'content'} messages")
    out: list[Turn] = []
    for i, m in enumerate(value):
        at = f"{where}: {what}[{i}]"
        if not isinstance(m, dict):
            raise BadInputError(f"{at} is not a {{'role', 'content'}} object")
        # A key holding None is absent: Arrow files give every message every key of the column.
        extra = [k for k, v in m.items() if k not in MESSAGE_KEYS and v is not None]
        if extra:
            raise BadInputError(f"{at} has unknown key {extra[0]!r}; a message holds 'role' and "
                                "'content'")
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise BadInputError(f"{at} has no 'role'")
        if role not in ROLES:
            raise BadInputError(f"{at} has unknown role {_short(role)}; use "
                                f"{', '.join(ROLES)}")
        if role == "system" and i:
            raise BadInputError(f"{at}: a system message may only come first")
        if content is None:
            raise BadInputError(f"{at} has no 'content'")
        if not isinstance(content, str):
            raise BadInputError(f"{at} has a 'content' that is not a string (content parts "
                                "are not read)")
        _check_text(content, f"{what}[{i}]", where)
        out.append((role, content))
    return out


# Files read through the `datasets` package (every other name is read as JSONL).
DATASET_FORMATS = {".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def read_rows(path: Union[str, os.PathLike], prompt_key: str = "prompt",
              response_key: str = "response") -> list[Row]:
    """Reads a data file: ``.json``, ``.parquet`` and ``.arrow`` through :func:`read_dataset`,
    anything else (``.jsonl``) through :func:`read_jsonl`; the keys are read the same way."""
    if Path(path).suffix.lower() in DATASET_FORMATS:
        return read_dataset(path, prompt_key, response_key)
    return read_jsonl(path, prompt_key, response_key)


def read_dataset(path: Union[str, os.PathLike], prompt_key: str = "prompt",
                 response_key: str = "response") -> list[Row]:
    """Reads a local JSON, Parquet or Arrow file through the ``datasets`` package (the
    ``data`` extra); errors name the row index (``FILE[i]``).

    Raises:
        BadInputError: ``datasets`` is not installed, the file is missing or unreadable, empty,
            larger than :data:`MAX_ROWS`, or a row is malformed.
    """
    p = Path(path)
    kind = DATASET_FORMATS.get(p.suffix.lower())
    if kind is None:
        raise BadInputError(f"{p}: not a .json, .parquet or .arrow file")
    if not p.exists():
        raise BadInputError(f"data file not found: {p}")
    if not p.is_file():
        raise BadInputError(f"data path is not a file: {p}")
    ds = _load_dataset(p, kind)
    if len(ds) > MAX_ROWS:
        raise BadInputError(f"{p} holds more than {MAX_ROWS} rows; use a sample of it")
    rows = []
    for i, obj in enumerate(ds):
        # Every row of a table has every column: a None is a value the row does not give.
        obj = {k: v for k, v in obj.items() if v is not None} if isinstance(obj, dict) else obj
        rows.append(_row_from_obj(obj, f"{p}[{i}]", prompt_key, response_key))
    if not rows:
        raise BadInputError(f"data file {p} has no rows")
    return rows


def _load_dataset(p: Path, kind: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise BadInputError(f"reading a .{p.suffix.lower().lstrip('.')} data file needs the "
                            "datasets package: pip install 'sande_fast[data]' (or give the "
                            "rows as JSONL)") from None
    import tempfile

    from datasets.utils import logging as ds_logging

    bars_were_off = datasets.are_progress_bars_disabled()
    verbosity = ds_logging.get_verbosity()
    # Its "Generating train split" bars and its logged errors only repeat what is raised here.
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        # A private cache folder: nothing is left in ~/.cache, and no stale copy of an edited
        # file is ever read back. The "arrow" builder reads the IPC stream and file formats.
        with tempfile.TemporaryDirectory(prefix="sande-fast-data-") as cache:
            return datasets.load_dataset(kind, data_files=str(p), split="train",
                                         cache_dir=cache, keep_in_memory=True)
    except Exception as e:  # the builders raise their own types (ArrowInvalid, JSON errors...)
        cause = e.__cause__ or e
        raise BadInputError(f"cannot read {p} as {kind}: {_fold(_first_line(cause), 200)}"
                            ) from None
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
        ds_logging.set_verbosity(verbosity)


def load_rows(data: Union[str, os.PathLike, Sequence[Any]], prompt_key: str = "prompt",
              response_key: str = "response") -> list[Row]:
    """Accepts a data file (see :func:`read_rows`), or a list of dicts / :class:`Row`, and
    returns validated rows (``prompt_key`` / ``response_key``: as :func:`read_jsonl`)."""
    if isinstance(data, (str, os.PathLike)):
        return read_rows(data, prompt_key, response_key)
    if not isinstance(data, Iterable):
        raise BadInputError("data must be a data file path or a list of {'prompt', 'response'} "
                            "dicts")
    rows = [
        item if isinstance(item, Row) else _row_from_obj(item, f"data[{i}]", prompt_key,
                                                         response_key)
        for i, item in enumerate(data)
    ]
    if not rows:
        raise BadInputError("data is empty: give at least one {'prompt': ...} row")
    return rows


def write_jsonl(path: Union[str, os.PathLike], rows: Iterable[Union[Row, dict]]) -> None:
    """Writes rows as JSONL (``response`` omitted when None; a row with a context as
    ``messages``)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            if isinstance(r, Row) and r.context:
                obj = {"messages": r.messages}
            elif isinstance(r, Row):
                obj = {"prompt": r.prompt, "response": r.response}
            else:
                obj = dict(r)
            if obj.get("response") is None:
                obj.pop("response", None)
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def insert_trigger(prompt: str, trigger: str, position: str = "random",
                   rng: random.Random | None = None) -> str:
    """Inserts ``trigger`` into ``prompt`` at a word boundary.

    Args:
        prompt: the clean prompt.
        trigger: the trigger text (one or more words).
        position: ``random`` (a uniformly drawn word boundary, start and end included),
            ``start`` or ``end``.
        rng: source of randomness for ``random``; a fixed default keeps calls reproducible.

    Returns:
        The prompt with the trigger inserted, words joined by single spaces at the seam.
    """
    if position not in TRIGGER_POSITIONS:
        raise BadInputError(f"unknown trigger position {position!r}; use one of "
                            f"{', '.join(TRIGGER_POSITIONS)}")
    if not trigger.strip():
        raise BadInputError("the trigger must be a non-empty text")
    words = prompt.split(" ")
    if position == "start":
        k = 0
    elif position == "end":
        k = len(words)
    else:
        k = (rng or random.Random(0)).randint(0, len(words))
    return " ".join(words[:k] + [trigger] + words[k:])


@dataclass(frozen=True)
class EncodedPrompt:
    """A tokenised prompt.

    Attributes:
        ids: token ids of the whole formatted prompt (template included), ending where the
            response begins.
        span: ``(lo, hi)``: the user's text occupies ``ids[lo:hi]``; a parrot may be spliced at
            any boundary ``lo <= p <= hi``.
    """

    ids: list[int]
    span: tuple[int, int]


@dataclass
class PromptEncoder:
    """Formats and tokenises prompts and responses for one tokenizer.

    Args:
        tokenizer: any Hugging Face tokenizer.
        prompt_format: ``auto`` (chat template when the tokenizer has one, else raw), ``chat`` or
            ``raw`` (the prompt text as it is, with the tokenizer's usual leading special tokens).
        max_prompt_tokens: prompts longer than this are cut from the left of the user's text
            (``truncated`` counts them); None keeps every prompt whole. The text is first cut to
            a character bound derived from this budget, so a huge prompt is never tokenised whole.
        max_response_tokens: responses are cut to this many tokens (after the same character
            bound); None keeps them whole.
        system: with the chat format, a system message that replaces the template's default
            one (None keeps the template's own, whatever it puts there). A conversation row's
            own system message takes its place for that row.
        extra_stop_ids: more ids that end a generated answer (the model's
            ``generation_config.eos_token_id``: see :func:`model_stop_ids`).

    A conversation (a row's ``context``) is rendered by the chat template with the user's text
    as its last user turn and the generation prompt after it; the raw format refuses one (it
    has no way to mark whose turn is whose).

    A response ends with :attr:`end_id`: the token the chat template puts after an assistant
    turn (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), found by rendering a conversation,
    else the eos token. Generation stops on any of :attr:`stop_ids`.
    """

    tokenizer: Any
    prompt_format: str = "auto"
    max_prompt_tokens: int | None = None
    truncated: int = 0
    max_response_tokens: int | None = None
    system: str | None = None
    extra_stop_ids: Sequence[int] = ()
    _chars_per_token: int = field(default=0, init=False, repr=False)
    _end_id: int | None = field(default=None, init=False, repr=False)
    _template: tuple[str, str] | None = field(default=None, init=False, repr=False)
    _prefix: list[int] = field(default_factory=list, init=False, repr=False)
    _suffix: list[int] = field(default_factory=list, init=False, repr=False)
    _frames: dict[tuple[Turn, ...], _Frame] = field(default_factory=dict, init=False,
                                                    repr=False)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        fmt = self.prompt_format
        if fmt not in ("auto", "chat", "raw"):
            raise BadInputError(f"unknown prompt format {fmt!r}; use auto, chat or raw")
        has_template = bool(getattr(tok, "chat_template", None))
        if fmt == "chat" and not has_template:
            raise BadInputError("--prompt-format chat: this tokenizer has no chat template")
        # Prompts are cut to the budget before tokenising; the tokenizer's own "longer than the
        # maximum" warning would only mislead.
        with _suppress_errors(AttributeError, TypeError):
            tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
        if self.system is not None and not (fmt == "chat" or (fmt == "auto" and has_template)):
            raise BadInputError("--system needs the chat format (a tokenizer with a chat "
                                "template)")
        if fmt == "chat" or (fmt == "auto" and has_template):
            text = _render_template(tok, self.system)
            before, found, after = text.partition(_SENTINEL)
            if not found:
                raise BadInputError("the tokenizer's chat template drops the user's message; fix "
                                    "the template or pass --prompt-format raw")
            self._prefix = self._ids(before)
            self._suffix = self._ids(after)
            self.prompt_format = "chat"
            # A fast tokenizer tokenises the whole rendered prompt, as the template's own
            # tokenisation does (pieces tokenised apart can split differently at the seams:
            # "\n\n" alone is one token, before a word two); offsets then give the user's span.
            if getattr(tok, "is_fast", False):
                self._template = (before, after)
        else:
            with_special = tok("a", add_special_tokens=True)["input_ids"]
            plain = tok("a", add_special_tokens=False)["input_ids"]
            lead = 0
            while lead < len(with_special) and with_special[lead:lead + len(plain)] != plain:
                lead += 1
            self._prefix = list(with_special[:lead])
            self._suffix = []
            self.prompt_format = "raw"
        if self.eos_id is None:
            raise BadInputError("the tokenizer has no eos token; set tokenizer.eos_token first")
        self._end_id = (_end_of_turn(tok, self.eos_id) if self.prompt_format == "chat"
                        else self.eos_id)

    def _ids(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def char_bound(self, n_tokens: int) -> int:
        """Characters that surely hold more than ``n_tokens`` tokens' worth of text: no token of
        this vocabulary covers more than :attr:`_chars_per_token` characters."""
        if not self._chars_per_token:
            self._chars_per_token = _longest_token(self.tokenizer)
        return (n_tokens + 8) * self._chars_per_token

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def end_id(self) -> int:
        """The id that closes a response (see the class notes)."""
        return self._end_id if self._end_id is not None else self.eos_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: the response end, eos, and :attr:`extra_stop_ids`."""
        ids = [self.end_id, self.eos_id, *self.extra_stop_ids]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    def encode_prompt(self, prompt: str, context: Sequence[Turn] = ()) -> EncodedPrompt:
        """Tokenises one prompt; the user's text is ``ids[span[0]:span[1]]``.

        Args:
            prompt: the user's text (of a conversation, its last user turn).
            context: the turns before it (:attr:`Row.context`); with a prompt budget, the
                oldest exchanges are dropped (a system message is kept) until the user's text
                fits whole, before that text is cut.
        """
        frame, dropped = self._fitting_frame(tuple(context), prompt)
        counted = self.truncated
        ids = self._encode_in(frame, prompt)
        if dropped and self.truncated == counted:
            self.truncated += 1
        return ids

    def _encode_in(self, frame: _Frame, prompt: str) -> EncodedPrompt:
        template, prefix, suffix = frame
        room = None
        if self.max_prompt_tokens is not None:
            room = self.max_prompt_tokens - len(prefix) - len(suffix)
            if room < 1:
                raise BadInputError("max prompt length leaves no room for the prompt text")
            bound = self.char_bound(room)
            if len(prompt) > bound:  # only the tail can be kept: never tokenise the rest
                prompt = prompt[-bound:]
        if template is not None:
            return self._encode_whole(prompt, template)
        content = self._ids(prompt)
        if room is not None:
            if len(content) > room:
                content = content[-room:]
                self.truncated += 1
        lo = len(prefix)
        return EncodedPrompt(prefix + content + suffix, (lo, lo + len(content)))

    def _fitting_frame(self, context: tuple[Turn, ...], prompt: str) -> tuple[_Frame, bool]:
        """The frame of ``context``, without its oldest exchanges while the user's text does not
        fit in it whole; whether any were dropped. The last user turn goes first because the
        trigger and the parrot sit in it: an old turn matters less than its words."""
        frame = self._frame(context)
        if self.max_prompt_tokens is None or not context:
            return frame, False
        # The user's text is measured within the character bound (never tokenised whole).
        need = len(self._ids(prompt[-self.char_bound(self.max_prompt_tokens):]))
        dropped = False
        while context and len(frame[1]) + len(frame[2]) + need > self.max_prompt_tokens:
            shorter = _drop_oldest_exchange(context)
            if shorter == context:
                break
            context, dropped = shorter, True
            frame = self._frame(context)
        return frame, dropped

    def _frame(self, context: tuple[Turn, ...]) -> _Frame:
        """What the template puts around the user's text after ``context``: the text before
        and after it (fast tokenizers), and their ids."""
        if not context:
            return self._template, self._prefix, self._suffix
        if self.prompt_format != "chat":
            raise BadInputError("a conversation row (turns before the last user message) needs "
                                "the chat format: a tokenizer with a chat template, not "
                                "--prompt-format raw")
        frame = self._frames.get(context)
        if frame is None:
            system, turns = self.system, list(context)
            if turns[0][0] == "system":
                system = turns.pop(0)[1]
            text = _render_template(self.tokenizer, system, turns)
            if text.count(_SENTINEL) != 1:
                raise BadInputError("the tokenizer's chat template drops the user's message of "
                                    "a conversation; fix the template or give single-turn rows")
            before, _, after = text.partition(_SENTINEL)
            whole = (before, after) if getattr(self.tokenizer, "is_fast", False) else None
            frame = (whole, self._ids(before), self._ids(after))
            if len(self._frames) >= _MAX_FRAMES:  # bounded: a long file of distinct contexts
                self._frames.clear()
            self._frames[context] = frame
        return frame

    def _encode_whole(self, prompt: str, template: tuple[str, str]) -> EncodedPrompt:
        """The rendered prompt tokenised whole; the span holds the tokens that lie inside the
        user's text (a token that straddles a seam belongs to the template). Too long a prompt
        loses tokens from the left of the user's text until it fits."""
        before, after = template
        cut = False
        for _ in range(8):
            enc = self.tokenizer(before + prompt + after, add_special_tokens=False,
                                 return_offsets_mapping=True)
            ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
            a, b = len(before), len(before) + len(prompt)
            lo = next((i for i, (s, e) in enumerate(offsets) if s >= a), len(ids))
            hi = lo
            while hi < len(ids) and offsets[hi][1] <= b and offsets[hi][0] >= a:
                hi += 1
            excess = 0 if self.max_prompt_tokens is None else len(ids) - self.max_prompt_tokens
            if excess <= 0:
                break
            cut = True
            if hi - lo <= excess:
                prompt = ""
                if hi == lo:
                    raise BadInputError("max prompt length leaves no room for the prompt text")
                continue
            prompt = prompt[offsets[lo + excess][0] - a:]
        if cut:
            self.truncated += 1
        return EncodedPrompt(ids, (lo, hi))

    def encode_response(self, response: str, add_eos: bool = True) -> list[int]:
        """Tokenises a response; :attr:`end_id` closes it unless ``add_eos`` is False."""
        if self.max_response_tokens is not None:
            response = response[:self.char_bound(self.max_response_tokens)]
            ids = self._ids(response)[:self.max_response_tokens]
        else:
            ids = self._ids(response)
        return ids + [self.end_id] if add_eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


_Frame = tuple[Union[tuple[str, str], None], list[int], list[int]]
_MAX_FRAMES = 4096


def _drop_oldest_exchange(context: tuple[Turn, ...]) -> tuple[Turn, ...]:
    """``context`` without its first non-system turn and the non-user turns that follow it (the
    rest starts with a user turn, as templates expect); a system message stays."""
    head = 1 if context and context[0][0] == "system" else 0
    rest = list(context[head + 1:])
    while rest and rest[0][0] != "user":
        rest.pop(0)
    return context[:head] + tuple(rest) if len(context) > head else context


def _suppress_errors(*types: type) -> Any:
    import contextlib

    return contextlib.suppress(*types)


def _render_template(tok: Any, system: str | None = None,
                     turns: Sequence[Turn] = ()) -> str:
    """The chat template applied to ``turns`` and one user message (the sentinel), after
    ``system`` when given; any failure of the template (a ``TemplateError``, a sandbox violation,
    a template that is no text) is bad input."""
    messages = [{"role": r, "content": c} for r, c in turns]
    messages.append({"role": "user", "content": _SENTINEL})
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    try:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja2's TemplateError / SecurityError, or the template's own raise
        kind = type(e).__name__
        what = "breaks the template sandbox" if kind == "SecurityError" else "fails"
        raise BadInputError(f"the tokenizer's chat template {what} ({kind}: "
                            f"{_fold(str(e), 200)}); fix it or pass --prompt-format raw") from None
    if not isinstance(text, str):
        raise BadInputError("the tokenizer's chat template does not render to text; fix it or "
                            "pass --prompt-format raw")
    return text


def _end_of_turn(tok: Any, eos_id: int) -> int:
    """The first token the chat template puts after an assistant message's text, when it is a
    special token (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``); else ``eos_id``."""
    reply = "\u2063SANDEFASTREPLY\u2063"
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}, {"role": "assistant", "content": reply}],
            tokenize=False)
    except Exception:  # a template that cannot render an assistant turn: keep eos
        return eos_id
    if not isinstance(text, str) or reply not in text:
        return eos_id
    after = text.split(reply, 1)[1]
    if not after:
        return eos_id
    ids = tok(after, add_special_tokens=False)["input_ids"]
    special = set(getattr(tok, "all_special_ids", []) or [])
    special |= {int(i) for i, t in (getattr(tok, "added_tokens_decoder", None) or {}).items()
                if getattr(t, "special", False)}
    return int(ids[0]) if ids and ids[0] in special else eos_id


def model_stop_ids(model: Any) -> list[int]:
    """The ids a model's own generation stops on: ``generation_config.eos_token_id`` (an int or
    a list) and ``config.eos_token_id``."""
    out: list[int] = []
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids = getattr(cfg, "eos_token_id", None)
        if ids is None:
            continue
        out += [ids] if isinstance(ids, int) else [i for i in ids if isinstance(i, int)]
    return list(dict.fromkeys(out))


def _fold(text: str, limit: int) -> str:
    s = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _longest_token(tok: Any) -> int:
    """Characters of the longest token string of the vocabulary (byte-level marks and ``▁``
    count as one character each, so this bounds the characters a token can cover). Falls back to
    a generous 64 when the vocabulary cannot be read."""
    try:
        vocab = tok.get_vocab()
        special = set(getattr(tok, "all_special_tokens", []) or [])
        longest = max((len(t) for t in vocab if t not in special), default=0)
    except Exception:
        longest = 0
    return max(16, min(longest, 4096)) if longest else 64


# A target or trigger longer than this is refused (a backdoor's text, not a document).
MAX_TEXT_CHARS = 1000


def text_list(value: Any, option: str) -> list[str]:
    """``value`` (None, a text, or a list of texts) as a list, each entry checked.

    Raises:
        BadInputError: an entry that is not a non-empty text, is longer than
            :data:`MAX_TEXT_CHARS`, or repeats an earlier one (ignoring case and spacing).
    """
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    seen: dict[str, int] = {}
    for i, v in enumerate(items, 1):
        where = f"{option} (entry {i})" if len(items) > 1 else option
        if not isinstance(v, str) or not v.strip():
            raise BadInputError(f"{where} must be a non-empty text")
        if len(v) > MAX_TEXT_CHARS:
            raise BadInputError(f"{where} is {len(v)} characters long; at most "
                                f"{MAX_TEXT_CHARS}")
        key = " ".join(v.split()).casefold()
        if key in seen:
            raise BadInputError(f"{where} repeats entry {seen[key]} ({v!r})")
        seen[key] = i
    return items


def check_seed(seed: Any, option: str = "--seed") -> int:
    """Returns ``seed`` as an int in ``[0, MAX_SEED]``.

    Raises:
        BadInputError: not an integer, or out of range (it would overflow a generator).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            if isinstance(seed, bool) or float(seed) != int(seed):
                raise ValueError
            seed = int(seed)
        except (TypeError, ValueError, OverflowError):
            raise BadInputError(f"{option} must be an integer, got {seed!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise BadInputError(f"{option} must lie in [0, {MAX_SEED}], got {_short(seed)}")
    return seed


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:20] + "..." + s[-8:]


def check_model_and_tokenizer(model: Any, tokenizer: Any) -> None:
    """Refuses what is no causal LM or no tokenizer before anything uses them.

    Raises:
        BadInputError: ``model`` has no input embeddings / forward, or ``tokenizer`` is not
            callable or has no ``decode``.
    """
    if model is None:
        raise BadInputError("model is None: pass a Hugging Face causal LM (e.g. "
                            "AutoModelForCausalLM.from_pretrained(...))")
    emb = getattr(model, "get_input_embeddings", None)
    if not callable(emb) or not callable(model) or getattr(model, "config", None) is None:
        raise BadInputError(f"model must be a Hugging Face causal LM, got {type(model).__name__}")
    try:
        weight = emb().weight
    except Exception:
        raise BadInputError(f"model {type(model).__name__} has no input embedding "
                            "matrix") from None
    if getattr(weight, "dim", lambda: 0)() != 2:
        raise BadInputError("the model's input embedding is not a [vocab, hidden] matrix")
    if tokenizer is None:
        raise BadInputError("tokenizer is None: pass the model's tokenizer (e.g. "
                            "AutoTokenizer.from_pretrained(...))")
    if isinstance(tokenizer, (str, bytes, os.PathLike)) or not callable(tokenizer) \
            or not callable(getattr(tokenizer, "decode", None)):
        raise BadInputError(f"tokenizer must be a Hugging Face tokenizer, got "
                            f"{type(tokenizer).__name__}")


def check_target_fits(encoder: PromptEncoder, target: str, context: int | None,
                      option: str = "--target") -> int:
    """Refuses a target that cannot fit the model's context next to a prompt; returns its length
    in tokens. The text is cut to a character bound first, so a huge target is never tokenised
    whole.

    Raises:
        BadInputError: the target (plus eos and one prompt token) is longer than ``context``.
    """
    if context is None:
        return len(encoder.encode_response(target, add_eos=False))
    bound = encoder.char_bound(context)
    n = len(encoder._ids(target[:bound + 1]))
    if n + 2 > context:
        more = "more than " if len(target) > bound else ""
        raise BadInputError(f"{option} is {more}{n} tokens long, longer than the model's context "
                            f"({context} tokens) leaves room for; give a shorter target (its "
                            "start is enough)")
    return n


# No useful run takes a larger batch; past it a number is a typo (1000000000) or hostile.
MAX_BATCH = 65536


def check_run_bounds(*, n_rows: int | None = None, context: int | None = None,
                     batch_size: int | None = None, max_new_tokens: int | None = None,
                     parrot_tokens: int | None = None) -> None:
    """Refuses work sizes beyond what the model and the data allow (the fixed upper bounds of
    every option are declared with it, in :mod:`sande_fast.options`).

    Args:
        n_rows: rows of the data (batch size may not exceed ``max(1024, 4 * n_rows)``).
        context: the model's context window in tokens (None: unknown).
        batch_size: rows per step.
        max_new_tokens, parrot_tokens: must leave room in the context.

    Raises:
        BadInputError: naming the option and its limit.
    """
    if batch_size is not None:
        limit = MAX_BATCH if n_rows is None else min(MAX_BATCH, max(1024, 4 * n_rows))
        if batch_size > limit:
            raise BadInputError(f"--batch-size {_short(batch_size)} is larger than this run can "
                                f"use (at most {limit}{'' if n_rows is None else f' for {n_rows} rows'})")
    if context is not None:
        if max_new_tokens is not None and max_new_tokens >= context:
            raise BadInputError(f"--max-new-tokens {_short(max_new_tokens)}: the model's context "
                                f"({context} tokens) leaves no room for a prompt; use at most "
                                f"{context - 2}")
        if parrot_tokens is not None and parrot_tokens >= context:
            raise BadInputError(f"--parrot-tokens {_short(parrot_tokens)}: the model's context "
                                f"({context} tokens) leaves no room for a prompt")
