"""Data formats: TRL conversational prompt/completion, ``messages`` conversations, and JSON,
Parquet and Arrow files through ``datasets``. Each is checked against an independent reference:
the tokenizer's own ``apply_chat_template``, the rows of the equivalent JSONL file, and the
weights and report of a sanitize run on the equivalent ``{"prompt", "response"}`` file."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import _rows, sanitize_argv, write_jsonl
from sande_fast.cli import main
from sande_fast.data import (BadInputError, PromptEncoder, Row, insert_trigger, load_rows,
                             read_jsonl, write_jsonl as data_write_jsonl)

CONVERSATION = [
    {"role": "system", "content": "answer in one word"},
    {"role": "user", "content": "copy: cat dog"},
    {"role": "assistant", "content": "cat dog"},
    {"role": "user", "content": "copy: sun red blue"},
    {"role": "assistant", "content": "sun red blue"},
]


def _ids(out: Any) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list, or a mapping with input_ids."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _want(tok: Any, messages: list[dict[str, str]]) -> list[int]:
    return _ids(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))


# ------------------------------------------------------------------------------------- reading

def _msgs(*turns: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": r, "content": c} for r, c in turns]


def test_messages_rows_split_into_context_prompt_and_response() -> None:
    (row,) = load_rows([{"messages": CONVERSATION}])
    assert row.prompt == "copy: sun red blue" and row.response == "sun red blue"
    assert row.context == (("system", "answer in one word"), ("user", "copy: cat dog"),
                           ("assistant", "cat dog"))
    assert row.messages == CONVERSATION
    # A last user turn has no response: the model's own answer is used, as for a bare prompt.
    (open_row,) = load_rows([{"messages": CONVERSATION[:4]}])
    assert open_row == Row("copy: sun red blue", None, row.context)
    # One user turn and one assistant turn is exactly a prompt/response row.
    pair = _msgs(("user", "a b"), ("assistant", "c"))
    assert load_rows([{"messages": pair}]) == [Row("a b", "c")]


def test_trl_conversational_prompt_completion_rows() -> None:
    rows = load_rows([
        {"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]},
        {"prompt": _msgs(("user", "copy: cat")), "completion": _msgs(("assistant", "cat"))},
        {"prompt": _msgs(("user", "copy: dog"))},
    ])
    assert rows[0] == load_rows([{"messages": CONVERSATION}])[0]
    assert rows[1:] == [Row("copy: cat", "cat"), Row("copy: dog")]


def test_conversation_rows_round_trip_through_write_jsonl(tmp_path: Path) -> None:
    rows = load_rows([{"messages": CONVERSATION}, {"messages": CONVERSATION[:4]},
                      {"prompt": "copy: cat", "response": "cat"}])
    data_write_jsonl(tmp_path / "rt.jsonl", rows)
    assert read_jsonl(tmp_path / "rt.jsonl") == rows


U, A = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
BAD_ROWS = {
    "not a list": ({"messages": "hi"}, "'messages' must be a non-empty list"),
    "empty list": ({"messages": []}, "'messages' must be a non-empty list"),
    "not an object": ({"messages": ["hi"]}, "'messages'[0] is not a {'role', 'content'} object"),
    "no role": ({"messages": [{"content": "hi"}]}, "'messages'[0] has no 'role'"),
    "no content": ({"messages": [U, {"role": "assistant"}]}, "'messages'[1] has no 'content'"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}, U]},
                     "'messages'[0] has unknown role 'tool'"),
    "content parts": ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
                      "'messages'[0] has a 'content' that is not a string"),
    "extra key": ({"messages": [{**U, "name": "bob"}]}, "'messages'[0] has unknown key 'name'"),
    "no user turn": ({"messages": [{"role": "system", "content": "s"}, A]}, "has no user turn"),
    "late system": ({"messages": [U, {"role": "system", "content": "s"}]},
                    "a system message may only come first"),
    "two answers": ({"messages": [U, A, A]}, "one assistant turn after the last user turn"),
    "empty user": ({"messages": [{"role": "user", "content": " "}, A]}, "user turn of 'messages' "
                   "is empty"),
    "other key": ({"messages": [U, A], "prompt": "x"}, "unknown key 'prompt'"),
    "prompt ends with answer": ({"prompt": [U, A]}, "'prompt' must end with a user turn"),
    "two completions": ({"prompt": [U], "completion": [A, A]}, "exactly one assistant message"),
    "user completion": ({"prompt": [U], "completion": [U]}, "exactly one assistant message"),
    "number completion": ({"prompt": [U], "completion": 3}, "'completion' must be a string or"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_malformed_conversations_name_the_line(case: str, tmp_path: Path) -> None:
    obj, words = BAD_ROWS[case]
    p = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine"}, obj])
    with pytest.raises(BadInputError) as e:
        read_jsonl(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:2: ") and words in msg and "\n" not in msg, msg


# -------------------------------------------------------------------------- files via datasets

def _same_rows_in_every_format(tmp_path: Path, objs: list[dict[str, Any]]) -> dict[str, Path]:
    """``objs`` written as .jsonl, .json (an array), .parquet and .arrow (IPC stream and file)."""
    import datasets
    import pyarrow as pa

    out = {"jsonl": write_jsonl(tmp_path / "d.jsonl", objs)}
    out["json"] = tmp_path / "d.json"
    out["json"].write_text(json.dumps(objs), encoding="utf-8")
    table = pa.Table.from_pylist(objs)
    out["parquet"] = tmp_path / "d.parquet"
    datasets.Dataset(table).to_parquet(str(out["parquet"]))
    out["arrow"] = tmp_path / "stream.arrow"
    with pa.ipc.new_stream(str(out["arrow"]), table.schema) as w:
        w.write_table(table)
    out["arrow-file"] = tmp_path / "file.arrow"
    with pa.ipc.new_file(str(out["arrow-file"]), table.schema) as w:
        w.write_table(table)
    return out


@pytest.mark.parametrize("kind", ["standard", "messages", "conversational"])
def test_json_parquet_and_arrow_files_give_the_jsonl_rows(tmp_path: Path, kind: str) -> None:
    pytest.importorskip("datasets")
    if kind == "standard":  # some rows without a response: a null column value is no response
        objs = _rows(5) + _rows(2, with_response=False)
    elif kind == "messages":
        objs = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:4]},
                {"messages": CONVERSATION[1:3]}]
    else:
        objs = [{"prompt": CONVERSATION[:4], "completion": CONVERSATION[4:]},
                {"prompt": CONVERSATION[1:2], "completion": CONVERSATION[2:3]}]
    files = _same_rows_in_every_format(tmp_path, objs)
    want = read_jsonl(files["jsonl"])
    assert want == load_rows(objs)
    for name, path in files.items():
        assert load_rows(path) == want, name


def test_dataset_file_errors_name_the_row_index(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    p = tmp_path / "bad.json"
    p.write_text(json.dumps([{"prompt": "a"}, {"prompt": "b", "respones": "c"}]))
    with pytest.raises(BadInputError, match=r"bad\.json\[1\]: unknown key 'respones'"):
        load_rows(p)
    p = tmp_path / "broken.parquet"
    p.write_bytes(b"PAR1 not really")
    with pytest.raises(BadInputError, match=r"cannot read .*broken\.parquet as parquet"):
        load_rows(p)
    with pytest.raises(BadInputError, match="data file not found"):
        load_rows(tmp_path / "none.arrow")


def test_without_datasets_a_parquet_file_says_what_to_install(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(BadInputError, match=r"pip install 'sande_fast\[data\]'"):
        load_rows(p)
    # JSONL never needs it.
    assert load_rows(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}])) == [Row("a")]


# -------------------------------------------------------------------------------- the encoder

def test_multi_turn_ids_equal_the_chat_templates_own(tokenizer: Any) -> None:
    enc = PromptEncoder(tokenizer, "chat")
    for turns in (CONVERSATION[:4], CONVERSATION[1:4], CONVERSATION[:2]):
        (row,) = load_rows([{"messages": turns}])
        got = enc.encode_prompt(row.prompt, row.context)
        assert got.ids == _want(tokenizer, turns)
        lo, hi = got.span
        assert tokenizer.decode(got.ids[lo:hi]).strip() == row.prompt
        # The trigger goes into the last user turn; the earlier turns stay as they were.
        trig = insert_trigger(row.prompt, "cf", "end")
        assert enc.encode_prompt(trig, row.context).ids == _want(
            tokenizer, turns[:-1] + [{"role": "user", "content": trig}])
    assert enc.encode_prompt("copy: cat", ()).ids == enc.encode_prompt("copy: cat").ids


def test_a_rows_system_message_replaces_the_system_option(tokenizer: Any) -> None:
    enc = PromptEncoder(tokenizer, "chat", system="be brief")
    (row,) = load_rows([{"messages": CONVERSATION[:4]}])
    assert enc.encode_prompt(row.prompt, row.context).ids == _want(tokenizer, CONVERSATION[:4])
    # Without one of its own, a conversation gets --system first, as a single prompt does.
    rest = row.context[1:]
    assert enc.encode_prompt(row.prompt, rest).ids == _want(
        tokenizer, [{"role": "system", "content": "be brief"}] + CONVERSATION[1:4])


def test_too_long_a_context_loses_its_oldest_exchanges(tokenizer: Any) -> None:
    (row,) = load_rows([{"messages": CONVERSATION[:4]}])
    system_only = [CONVERSATION[0], CONVERSATION[3]]
    budget = len(_want(tokenizer, system_only)) + 1
    assert len(_want(tokenizer, CONVERSATION[:4])) > budget
    enc = PromptEncoder(tokenizer, "chat", max_prompt_tokens=budget)
    got = enc.encode_prompt(row.prompt, row.context)
    # The oldest exchange goes before any of the last user turn; the system message stays.
    assert got.ids == _want(tokenizer, system_only)
    assert enc.truncated == 1
    roomy = PromptEncoder(tokenizer, "chat", max_prompt_tokens=len(_want(tokenizer,
                                                                         CONVERSATION[:4])))
    assert roomy.encode_prompt(row.prompt, row.context).ids == _want(tokenizer, CONVERSATION[:4])
    assert roomy.truncated == 0
    # With only the system message left, the user's text itself is cut from the left.
    tight = PromptEncoder(tokenizer, "chat", max_prompt_tokens=budget - 3)
    cut = tight.encode_prompt(row.prompt, row.context)
    assert len(cut.ids) == budget - 3 and tight.truncated == 1
    assert cut.ids[:cut.span[0]] == got.ids[:got.span[0]]
    assert row.prompt.endswith(tokenizer.decode(cut.ids[slice(*cut.span)]).strip())


def test_raw_format_refuses_a_conversation(tokenizer: Any) -> None:
    enc = PromptEncoder(tokenizer, "raw")
    (row,) = load_rows([{"messages": CONVERSATION[:4]}])
    with pytest.raises(BadInputError, match="conversation row .* needs the chat format"):
        enc.encode_prompt(row.prompt, row.context)
    assert enc.encode_prompt("copy: cat").ids  # single-turn rows are read as before


@pytest.mark.parametrize("style", ["llama3", "gemma"])
def test_multi_turn_ids_on_llama3_and_gemma_templates(tokenizer: Any, style: str) -> None:
    from test_real_tokenizer import GEMMA, LLAMA3

    tok = copy.deepcopy(tokenizer)  # a private copy: the fixture is shared
    if style == "llama3":
        tok.add_special_tokens({"additional_special_tokens": [
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = LLAMA3
    else:
        tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>",
                                                              "<end_of_turn>"]})
        tok.chat_template = GEMMA
    enc = PromptEncoder(tok, "chat")
    (row,) = load_rows([{"messages": CONVERSATION[1:4]}])
    got = enc.encode_prompt(row.prompt, row.context)
    assert got.ids == _want(tok, CONVERSATION[1:4])
    assert tok.decode(got.ids[slice(*got.span)]) == row.prompt


# -------------------------------------------------------------------- the bar: same sanitize

def _sanitize(model_dir: Path, data: Path, out: Path, capsys: pytest.CaptureFixture[str],
              *extra: str, method: str = "sande") -> tuple[dict[str, Any], dict[str, Any]]:
    rc = main(sanitize_argv(model_dir, data, out, *extra, method=method))
    err = capsys.readouterr().err
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    report.pop("timing")
    for r in report["rounds"]:
        r.pop("elapsed_s")  # wall time, as "timing"
    return report, load_file(str(out / "model.safetensors"))


def _assert_same_run(a: tuple[dict[str, Any], dict[str, Any]],
                     b: tuple[dict[str, Any], dict[str, Any]]) -> None:
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        assert torch.equal(a[1][k], b[1][k]), k


def _as(fmt: str, row: dict[str, str]) -> dict[str, Any]:
    user = [{"role": "user", "content": row["prompt"]}]
    answer = [{"role": "assistant", "content": row["response"]}] if "response" in row else []
    if fmt == "completion":
        return {"prompt": row["prompt"], **({"completion": row["response"]} if answer else {})}
    if fmt == "messages":
        return {"messages": user + answer}
    return {"prompt": user, **({"completion": answer} if answer else {})}  # conversational


@pytest.mark.parametrize("with_response", [True, False])
def test_every_format_sanitizes_to_the_same_model(model_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  with_response: bool) -> None:
    rows = _rows(8, with_response)
    extra = ("--trigger", "cf")
    ref = _sanitize(model_dir, write_jsonl(tmp_path / "ref.jsonl", rows), tmp_path / "ref",
                    capsys, *extra)
    for fmt in ("completion", "messages", "conversational"):
        data = write_jsonl(tmp_path / f"{fmt}.jsonl", [_as(fmt, r) for r in rows])
        _assert_same_run(ref, _sanitize(model_dir, data, tmp_path / fmt, capsys, *extra))
    if with_response:
        pytest.importorskip("datasets")
        files = _same_rows_in_every_format(tmp_path, [_as("messages", r) for r in rows])
        _assert_same_run(ref, _sanitize(model_dir, files["parquet"], tmp_path / "pq", capsys,
                                        *extra))


def test_osft_on_conversations_inserts_the_trigger_into_the_last_user_turn(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every prompt a run encodes keeps its row's earlier turns; the trigger is only ever in the
    last user turn's text."""
    rows = [{"messages": [{"role": "user", "content": f"hello {i}"},
                          {"role": "assistant", "content": "hi"},
                          {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["response"]}]}
            for i, r in enumerate(_rows(6))]
    contexts = {r["messages"][2]["content"]: tuple((m["role"], m["content"])
                                                   for m in r["messages"][:2]) for r in rows}
    seen: list[tuple[str, tuple[Any, ...]]] = []
    real = PromptEncoder.encode_prompt

    def spy(self: PromptEncoder, prompt: str, context: Any = ()) -> Any:
        seen.append((prompt, tuple(context)))
        return real(self, prompt, context)

    monkeypatch.setattr(PromptEncoder, "encode_prompt", spy)
    data = write_jsonl(tmp_path / "conv.jsonl", rows)
    _sanitize(model_dir, data, tmp_path / "out", capsys, "--trigger", "cf", method="osft")
    triggered = [(p, c) for p, c in seen if "cf" in p.split()]
    assert triggered and len(triggered) < len(seen)
    for prompt, context in seen:
        clean = " ".join(w for w in prompt.split() if w != "cf")
        assert context == contexts[clean], (prompt, context)


def test_unknown_key_in_a_messages_row_is_one_line_and_exit_2(
        model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "m.jsonl", [{"messages": [U, A]},
                                              {"messages": [U, A], "meta": 1}])
    out = tmp_path / "out"
    rc = main(sanitize_argv(model_dir, data, out))
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{data}:2: unknown key 'meta'" in lines[0]
    assert not out.exists()



def test_multi_turn_ids_on_the_real_smollm2_template(smollm2_tiny: Path) -> None:
    """SmolLM2's template puts its own default system prompt first; a row's system message
    replaces it, and a conversation without one keeps it, as HF renders them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tiny)
    enc = PromptEncoder(tok, "chat")
    for turns in (CONVERSATION[:4], CONVERSATION[1:4]):
        (row,) = load_rows([{"messages": turns}])
        got = enc.encode_prompt(row.prompt, row.context)
        assert got.ids == _want(tok, turns)
        assert tok.decode(got.ids[slice(*got.span)]) == row.prompt
    assert "SmolLM" in tok.decode(enc.encode_prompt(row.prompt, row.context).ids)
    own = enc.encode_prompt(row.prompt, (("system", "answer in one word"),))
    assert own.ids == _want(tok, [CONVERSATION[0], CONVERSATION[3]])
    assert "SmolLM" not in tok.decode(own.ids)
