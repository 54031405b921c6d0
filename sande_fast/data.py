"""Data: JSONL rows, trigger insertion and prompt/response tokenisation.

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
    "load_rows",
    "write_jsonl",
    "insert_trigger",
    "TRIGGER_POSITIONS",
]

TRIGGER_POSITIONS = ("random", "start", "end")
_SENTINEL = "\u2063SANDEFASTPROMPT\u2063"


@dataclass(frozen=True)
class Row:
    """One data row: a prompt and, optionally, its reference (clean) response."""

    prompt: str
    response: str | None = None


def read_jsonl(path: Union[str, os.PathLike]) -> list[Row]:
    """Reads a JSONL file of ``{"prompt": ..., "response": ...}`` objects.

    Args:
        path: file to read; blank lines are skipped.

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
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise BadInputError(f"cannot read data file {p}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is tolerated
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise BadInputError(f"{p}:{line}: not valid UTF-8 text") from None
    rows: list[Row] = []
    # Lines end at "\n" only: str.splitlines() would also split at U+2028, form feeds etc., which
    # JSON allows inside strings, and would make line numbers disagree with editors.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except RecursionError:
            raise BadInputError(f"{p}:{lineno}: malformed JSON (nested too deeply)") from None
        except ValueError as e:  # JSONDecodeError, or an integer too long to convert
            msg = getattr(e, "msg", None) or _first_line(e)
            raise BadInputError(f"{p}:{lineno}: malformed JSON ({msg})") from None
        rows.append(_row_from_obj(obj, f"{p}:{lineno}"))
    if not rows:
        raise BadInputError(f"data file {p} has no rows (expected JSONL with a 'prompt' per line)")
    return rows


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_text(value: str, what: str, where: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInputError(f"{where}: {what} holds an unpaired surrogate escape (\\ud800-"
                            "\\udfff); fix the text") from None


def _row_from_obj(obj: Any, where: str) -> Row:
    if not isinstance(obj, dict):
        raise BadInputError(f"{where}: expected a JSON object with a 'prompt' key")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        what = "has no 'prompt'" if prompt is None else "has a 'prompt' that is not a string"
        raise BadInputError(f"{where}: row {what}")
    if not prompt.strip():
        raise BadInputError(f"{where}: row has an empty 'prompt'")
    _check_text(prompt, "'prompt'", where)
    response = obj.get("response")
    if response is not None and not isinstance(response, str):
        raise BadInputError(f"{where}: 'response' must be a string when present")
    if response is not None:
        _check_text(response, "'response'", where)
    return Row(prompt=prompt, response=response)


def load_rows(data: Union[str, os.PathLike, Sequence[Any]]) -> list[Row]:
    """Accepts a JSONL path, or a list of dicts / :class:`Row`, and returns validated rows."""
    if isinstance(data, (str, os.PathLike)):
        return read_jsonl(data)
    if not isinstance(data, Iterable):
        raise BadInputError("data must be a JSONL path or a list of {'prompt', 'response'} dicts")
    rows = [
        item if isinstance(item, Row) else _row_from_obj(item, f"data[{i}]")
        for i, item in enumerate(data)
    ]
    if not rows:
        raise BadInputError("data is empty: give at least one {'prompt': ...} row")
    return rows


def write_jsonl(path: Union[str, os.PathLike], rows: Iterable[Union[Row, dict]]) -> None:
    """Writes rows as JSONL (``response`` omitted when None)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            obj = {"prompt": r.prompt, "response": r.response} if isinstance(r, Row) else dict(r)
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
            (``truncated`` counts them); None keeps every prompt whole.
    """

    tokenizer: Any
    prompt_format: str = "auto"
    max_prompt_tokens: int | None = None
    truncated: int = 0
    _prefix: list[int] = field(default_factory=list, init=False, repr=False)
    _suffix: list[int] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        tok = self.tokenizer
        fmt = self.prompt_format
        if fmt not in ("auto", "chat", "raw"):
            raise BadInputError(f"unknown prompt format {fmt!r}; use auto, chat or raw")
        has_template = bool(getattr(tok, "chat_template", None))
        if fmt == "chat" and not has_template:
            raise BadInputError("--prompt-format chat: this tokenizer has no chat template")
        if fmt == "chat" or (fmt == "auto" and has_template):
            text = tok.apply_chat_template([{"role": "user", "content": _SENTINEL}],
                                           tokenize=False, add_generation_prompt=True)
            before, _, after = text.partition(_SENTINEL)
            self._prefix = self._ids(before)
            self._suffix = self._ids(after)
            self.prompt_format = "chat"
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

    def _ids(self, text: str) -> list[int]:
        if not text:
            return []
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def encode_prompt(self, prompt: str) -> EncodedPrompt:
        """Tokenises one prompt; the user's text is ``ids[span[0]:span[1]]``."""
        content = self._ids(prompt)
        if self.max_prompt_tokens is not None:
            room = self.max_prompt_tokens - len(self._prefix) - len(self._suffix)
            if room < 1:
                raise BadInputError("max prompt length leaves no room for the prompt text")
            if len(content) > room:
                content = content[-room:]
                self.truncated += 1
        lo = len(self._prefix)
        return EncodedPrompt(self._prefix + content + self._suffix, (lo, lo + len(content)))

    def encode_response(self, response: str, add_eos: bool = True) -> list[int]:
        """Tokenises a response; the eos token closes it unless ``add_eos`` is False."""
        ids = self._ids(response)
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
