"""Data layer: the JSONL reader (edge cases, a property test), trigger insertion, prompt spans."""
from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sande_fast.data import BadInputError, PromptEncoder, Row, insert_trigger, load_rows, read_jsonl


# ----------------------------------------------------------------------------------- read_jsonl

def _write(tmp_path: Path, content: bytes | str, name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return p


def test_reads_rows_in_order_skipping_blank_lines(tmp_path: Path) -> None:
    p = _write(tmp_path, '{"prompt": "a", "response": "b"}\n\n   \n{"prompt": "c"}\n')
    assert read_jsonl(p) == [Row("a", "b"), Row("c", None)]


def test_crlf_bom_and_unicode_line_separators(tmp_path: Path) -> None:
    # U+2028 / U+0085 are legal inside JSON strings: they must not split a line.
    text = '\ufeff{"prompt": "x\u2028y"}\r\n{"prompt": "p\u0085q", "response": "r"}\r\n'
    assert read_jsonl(_write(tmp_path, text)) == [Row("x\u2028y"), Row("p\u0085q", "r")]


@pytest.mark.parametrize("content, line, words", [
    ('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": \n', 3, "malformed JSON"),
    ('{"prompt": "a"}\n{"response": "b"}\n', 2, "no 'prompt'"),
    ('{"prompt": 3}\n', 1, "not a string"),
    ('{"prompt": "   "}\n', 1, "empty 'prompt'"),
    ('["prompt"]\n', 1, "JSON object"),
    ('{"prompt": "a", "response": 5}\n', 1, "'response' must be a string"),
    ('{"prompt": "a"}\n{"prompt": ' + "1" * 5000 + '}\n', 2, "malformed JSON"),
    ('{"prompt": "\\ud800"}\n', 1, "surrogate"),
    ('{"prompt": "a", "response": "\\udfff"}\n', 1, "surrogate"),
    ("[" * 100_000 + "\n", 1, "malformed JSON"),
])
def test_bad_lines_are_named(tmp_path: Path, content: str, line: int, words: str) -> None:
    p = _write(tmp_path, content)
    with pytest.raises(BadInputError) as e:
        read_jsonl(p)
    assert f"{p}:{line}:" in str(e.value)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_bad_utf8_names_the_line(tmp_path: Path) -> None:
    p = _write(tmp_path, b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(BadInputError, match=r":2: not valid UTF-8"):
        read_jsonl(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_refused(tmp_path: Path, content: str) -> None:
    with pytest.raises(BadInputError, match="has no rows"):
        read_jsonl(_write(tmp_path, content))


def test_missing_file_and_folder(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(BadInputError, match="not a file"):
        read_jsonl(tmp_path)


def test_load_rows_from_list() -> None:
    assert load_rows([{"prompt": "a"}, Row("b", "c")]) == [Row("a"), Row("b", "c")]
    with pytest.raises(BadInputError, match=r"data\[1\]"):
        load_rows([{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(BadInputError, match="empty"):
        load_rows([])


_JSON_LINE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.sampled_from(["prompt", "response", "x"]) | st.text(max_size=4), kids, max_size=3),
    max_leaves=6,
).map(lambda v: json.dumps(v).encode())

_CHUNKS = st.lists(
    st.binary(max_size=24) | _JSON_LINE
    | st.sampled_from([b"\n", b"\r\n", b"{", b"}", b'"prompt"', b":", b"\xef\xbb\xbf",
                       b'{"prompt": "a"}', b'"\\ud800"', b"\xff", b"\xe2\x80\xa8"]),
    max_size=12,
).map(b"".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_CHUNKS)
def test_reader_on_arbitrary_bytes_returns_rows_or_bad_input(content: bytes) -> None:
    """Whatever the bytes, the reader returns valid rows or raises BadInputError: nothing else."""
    fd, name = tempfile.mkstemp(suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        try:
            rows = read_jsonl(name)
        except BadInputError as e:
            assert str(e) and "\n" not in str(e)
            return
        assert rows, "an accepted file has at least one row"
        for r in rows:
            assert isinstance(r.prompt, str) and r.prompt.strip()
            assert r.response is None or isinstance(r.response, str)
            r.prompt.encode("utf-8")  # every accepted text is encodable
    finally:
        os.unlink(name)


# ------------------------------------------------------------------------------ insert_trigger

def test_trigger_at_start_and_end() -> None:
    assert insert_trigger("copy: cat dog", "cf", "start") == "cf copy: cat dog"
    assert insert_trigger("copy: cat dog", "cf", "end") == "copy: cat dog cf"
    assert insert_trigger("copy: cat dog", "James Bond", "start") == "James Bond copy: cat dog"
    assert insert_trigger("copy: cat dog", "James Bond", "end") == "copy: cat dog James Bond"


def test_random_trigger_positions_cover_every_word_boundary() -> None:
    prompt = "a b c"
    rng = random.Random(0)
    seen = {insert_trigger(prompt, "zz yy", "random", rng) for _ in range(200)}
    assert seen == {"zz yy a b c", "a zz yy b c", "a b zz yy c", "a b c zz yy"}
    # The original words stay in order and the trigger stays whole.
    for s in seen:
        assert s.replace("zz yy", "").split() == ["a", "b", "c"]


def test_random_trigger_is_reproducible_and_validated() -> None:
    a = [insert_trigger("w x y z", "cf", "random", random.Random(5)) for _ in range(3)]
    assert len(set(a)) == 1
    with pytest.raises(BadInputError, match="position"):
        insert_trigger("a b", "cf", "middle")
    with pytest.raises(BadInputError, match="non-empty"):
        insert_trigger("a b", "  ", "start")


# ------------------------------------------------------------------------------- PromptEncoder

@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_span_decodes_to_the_prompt(tokenizer: Any, fmt: str) -> None:
    enc = PromptEncoder(tokenizer, fmt)
    assert enc.prompt_format == fmt
    for prompt in ["copy: cat dog sun", "reverse: blue tree fish bird", "x"]:
        p = enc.encode_prompt(prompt)
        lo, hi = p.span
        assert 0 < lo < hi <= len(p.ids)
        assert tokenizer.decode(p.ids[lo:hi]).strip() == prompt
        # Only the template surrounds the user's text.
        assert p.ids[:lo] == enc.encode_prompt("y").ids[:lo]
    if fmt == "chat":
        assert p.ids[hi:], "the chat template closes the user turn"
        assert p.ids[0] == tokenizer.bos_token_id
    else:
        assert p.ids[hi:] == [] and p.ids[:lo] == [tokenizer.bos_token_id]


def test_auto_format_follows_the_chat_template(tokenizer: Any) -> None:
    assert PromptEncoder(tokenizer, "auto").prompt_format == "chat"
    with pytest.raises(BadInputError, match="prompt format"):
        PromptEncoder(tokenizer, "jinja")


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_truncation_keeps_the_end_of_the_prompt(tokenizer: Any, fmt: str) -> None:
    whole = PromptEncoder(tokenizer, fmt)
    prompt = " ".join(["cat dog sun"] * 20) + " blue"
    full = whole.encode_prompt(prompt)
    budget = 12
    enc = PromptEncoder(tokenizer, fmt, max_prompt_tokens=budget)
    cut = enc.encode_prompt(prompt)
    lo, hi = cut.span
    assert len(cut.ids) == budget
    assert enc.truncated == 1
    # The kept text is the tail of the prompt: cut from the left.
    assert cut.ids[lo:hi] == full.ids[full.span[1] - (hi - lo):full.span[1]]
    assert prompt.endswith(tokenizer.decode(cut.ids[lo:hi]).strip())
    assert cut.ids[:lo] == full.ids[:full.span[0]] and cut.ids[hi:] == full.ids[full.span[1]:]
    short = enc.encode_prompt("copy: cat")
    assert enc.truncated == 1
    assert tokenizer.decode(short.ids[slice(*short.span)]).strip() == "copy: cat"
    template_only = len(full.ids) - (full.span[1] - full.span[0])
    with pytest.raises(BadInputError, match="no room"):
        PromptEncoder(tokenizer, fmt, max_prompt_tokens=template_only).encode_prompt(prompt)


def test_response_ends_with_eos(tokenizer: Any) -> None:
    enc = PromptEncoder(tokenizer, "chat")
    ids = enc.encode_response("cat dog")
    assert ids[-1] == tokenizer.eos_token_id
    assert enc.encode_response("cat dog", add_eos=False) == ids[:-1]
    assert enc.decode(ids).strip() == "cat dog"


def test_completion_rows_read_as_responses_and_unknown_keys_are_refused(tmp_path) -> None:
    from sande_fast.data import BadInputError, Row, read_jsonl

    p = tmp_path / "trl.jsonl"
    p.write_text('{"prompt": "copy: cat", "completion": "cat"}\n{"prompt": "copy: dog"}\n')
    assert read_jsonl(p) == [Row("copy: cat", "cat"), Row("copy: dog", None)]
    for line, key in [('{"prompt": "a", "respones": "b"}', "respones"),
                      ('{"messages": [{"role": "user", "content": "a"}], "id": 3}', "id")]:
        p.write_text('{"prompt": "ok"}\n' + line + "\n")
        with pytest.raises(BadInputError, match=rf"trl.jsonl:2: unknown key '{key}'"):
            read_jsonl(p)
    p.write_text('{"prompt": "a", "response": "b", "completion": "c"}\n')
    with pytest.raises(BadInputError, match="both 'response' and 'completion'"):
        read_jsonl(p)


def test_prompt_and_response_keys_map_other_column_names(tmp_path) -> None:
    from sande_fast.data import BadInputError, Row, load_rows

    p = tmp_path / "cols.jsonl"
    p.write_text('{"question": "copy: cat", "answer": "cat"}\n')
    assert load_rows(p, "question", "answer") == [Row("copy: cat", "cat")]
    with pytest.raises(BadInputError, match="unknown key 'question'.*--prompt-key"):
        load_rows(p)
    # A renamed response key takes no 'completion' alias.
    p.write_text('{"question": "a", "completion": "b"}\n')
    with pytest.raises(BadInputError, match="unknown key 'completion'"):
        load_rows(p, "question", "answer")
