"""One source of options: the CLI, the configs, the docs and ``--config FILE`` agree."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from conftest import sanitize_argv
from sande_fast.cli import build_parser, main
from sande_fast.errors import BadInputError
from sande_fast.options import (EvalConfig, ProbeConfig, SanitizeConfig, markdown,
                                option_fields, read_config_file, resolve)

ROOT = Path(__file__).resolve().parents[1]

# What each command declares itself (the run's inputs); everything else is an option.
RUN_INPUTS = {
    "sanitize": {"model", "data", "target", "targets", "out", "method", "trigger", "eval_target",
                 "eval_data", "fsdp", "force", "dtype", "trust_remote_code",
                 "save_patch", "base_model"},
    "demo": {"out", "cache_dir", "method", "trigger", "eval_target", "eval_data", "fsdp",
             "force", "dtype", "trust_remote_code"},
    "probe": {"model", "data", "target", "targets", "json", "force", "dtype",
              "trust_remote_code", "base_model"},
    "eval": {"model", "data", "target", "targets", "trigger", "json", "force", "dtype",
             "trust_remote_code", "reference", "base_model"},
}
# Every command also takes the process-level logging flags.
for _inputs in RUN_INPUTS.values():
    _inputs |= {"log_level", "log_file"}

CONFIGS = {"sanitize": SanitizeConfig, "demo": SanitizeConfig, "probe": ProbeConfig,
           "eval": EvalConfig}


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_option_is_a_flag_and_every_flag_an_option_or_input(command: str) -> None:
    p = _subparser(command)
    dests = {a.dest for a in p._actions if a.dest != "help"}
    names = {n for n, _, _ in option_fields(CONFIGS[command])}
    assert dests == names | RUN_INPUTS[command] | {"config"}
    for action in p._actions:
        if action.dest in names:
            opt = dict((n, o) for n, o, _ in option_fields(CONFIGS[command]))[action.dest]
            assert opt.help in action.help  # the help text is the declaration's


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_flags_left_out_give_the_declared_defaults(command: str) -> None:
    from sande_fast.options import from_namespace

    required = {"sanitize": ["--model", "m", "--data", "d", "--target", "t", "--out", "o"],
                "probe": ["--model", "m", "--data", "d", "--target", "t"],
                "eval": ["--model", "m", "--data", "d", "--target", "t"], "demo": []}[command]
    ns = build_parser().parse_args([command, *required])
    assert from_namespace(ns, CONFIGS[command]) == CONFIGS[command]()


def test_flags_reach_the_config() -> None:
    from sande_fast.options import from_namespace

    ns = build_parser().parse_args(["demo", "--rounds", "3", "--plain", "--packed", "off",
                                    "--overwrite-lr", "3e-5", "--quiet"])
    cfg = from_namespace(ns, SanitizeConfig)
    assert (cfg.rounds, cfg.fast, cfg.packed, cfg.overwrite_lr, cfg.quiet) == (
        3, False, False, 3e-5, True)


def test_docs_are_generated_from_the_declarations() -> None:
    text = (ROOT / "docs" / "OPTIONS.md").read_text(encoding="utf-8")
    assert text == markdown(), "regenerate: python -m sande_fast.options > docs/OPTIONS.md"
    for config in (SanitizeConfig, ProbeConfig, EvalConfig):
        for name, opt, _ in option_fields(config):
            assert opt.help in text, name


def test_resolve_is_pure_and_fills_every_auto_value() -> None:
    cfg = SanitizeConfig()
    osft = resolve(cfg, "osft", n_params=10_000, context=128, chat_template=True)
    assert cfg == SanitizeConfig()  # the input is unchanged
    assert (osft.optimizer, osft.overwrite_steps, osft.overwrite_lr) == ("sgd", 200, 1e-4 / 16)
    big = resolve(cfg, "sande", n_params=10**9, context=None, chat_template=False)
    assert (big.optimizer, big.overwrite_steps, big.overwrite_lr) == ("adamw", 50, 2e-5)
    # From 50M parameters osft and sft train with AdamW too; below, CalibratedSGD.
    for method in ("osft", "sft"):
        assert resolve(cfg, method, n_params=50_000_000, context=None,
                       chat_template=True).optimizer == "adamw"
        assert resolve(cfg, method, n_params=49_999_999, context=None,
                       chat_template=True).optimizer == "sgd"
    assert (big.prompt_format, osft.prompt_format) == ("raw", "chat")
    assert resolve(cfg, "sande-p", n_params=1, context=None,
                   chat_template=False).max_clean_drop == 0.03
    assert big.max_clean_drop == 0.02 and big.probe_steps == cfg.simulate_steps
    assert (big.simulate_stop_loss, osft.simulate_stop_loss) == (0.01, 0.0)
    assert resolve(SanitizeConfig(simulate_stop_loss=0.2), "sande", n_params=1, context=None,
                   chat_template=False).simulate_stop_loss == 0.2
    # context 128: room for prompt = 128 - 6 parrot rows - 32 answer tokens - 1
    assert osft.max_prompt_tokens == 89 and big.max_prompt_tokens is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        osft.seed = 3  # type: ignore[misc]
    with pytest.raises(BadInputError, match="--max-prompt-tokens"):
        resolve(dataclasses.replace(cfg, max_prompt_tokens=100), "sande", n_params=1,
                context=128, chat_template=False)


def test_config_file_json_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"simulate_steps": 7, "rounds": 2}))
    (tmp_path / "a.yaml").write_text("simulate_steps: 7\nrounds: 2\n")
    for name in ("a.json", "a.yaml"):
        assert read_config_file(tmp_path / name) == {"simulate_steps": 7, "rounds": 2}
    (tmp_path / "bad.json").write_text(json.dumps({"simulate_step": 7}))
    with pytest.raises(BadInputError, match="unknown option.*simulate_step"):
        read_config_file(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(BadInputError, match="not valid JSON"):
        read_config_file(tmp_path / "broken.json")


def test_report_config_fed_back_reproduces_the_run(model_dir: Path, data_file: Path,
                                                   tmp_path: Path) -> None:
    first = tmp_path / "first"
    assert main(sanitize_argv(model_dir, data_file, first, "--seed", "3",
                              "--parrot-tokens", "2")) == 0
    report = json.loads((first / "report.json").read_text())
    # Only the inputs on the command line; every option comes from the report.
    second = tmp_path / "second"
    assert main(["sanitize", "--model", str(model_dir), "--data", str(data_file), "--target",
                 report["target"], "--out", str(second), "--config",
                 str(first / "report.json")]) == 0
    again = json.loads((second / "report.json").read_text())
    assert again["config"] == report["config"]
    for key in ("before", "after", "curves"):
        assert again[key] == report[key], key
    # Each round's numbers again; only when it ended (wall time) may differ.
    def timeless(rounds):
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rounds]
    assert timeless(again["rounds"]) == timeless(report["rounds"])
    assert all("elapsed_s" in r for r in again["rounds"])
    # A flag on the command line wins over the file.
    third = tmp_path / "third"
    assert main(["sanitize", "--model", str(model_dir), "--data", str(data_file), "--target",
                 report["target"], "--out", str(third), "--config", str(first / "report.json"),
                 "--seed", "4"]) == 0
    assert json.loads((third / "report.json").read_text())["config"]["seed"] == 4
