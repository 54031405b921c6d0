"""FSDP2 on CPU (gloo, 2 ranks): the sharded run matches one process, and fails atomically.

* The sharded loss steps (stage 1 and 2, uneven micro-batch counts) and greedy generation (uneven
  prompt shares, eos early stop) match the one-process results on three architectures.
* ``torchrun --nproc_per_node 2 -m sande_fast sanitize --fsdp`` writes the same files as one
  process, weights within tolerance, loadable with ``AutoModelForCausalLM``, same asr.
* A rank that fails mid-run (a fault injected on rank 1 by a wrapper of the CLI) makes the job exit non-zero and leaves
  ``--out`` untouched, with no temporary siblings.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from conftest import TARGET, TRIGGER, leftovers

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

REPO = Path(__file__).resolve().parents[1]
OPTS = ["--target", TARGET, "--trigger", TRIGGER, "--method", "sande", "--simulate-steps", "3",
        "--overwrite-steps", "3", "--rounds", "1", "--eval-rows", "8", "--batch-size", "4",
        "--max-new-tokens", "4", "--quiet", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _torchrun(model: Path, data: Path, out: Path, *extra: str,
              entry: Sequence[str] = ("-m", "sande_fast")) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *entry, "sanitize", "--model", str(model), "--data", str(data),
           "--out", str(out), *OPTS, "--fsdp", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)


# ``sande-fast`` with a fault injected: rank RANK raises at its CALL-th sharded loss accumulation
# (argv: RANK CALL, then the command line).
FAULTY_CLI = """
import sys

import torch.distributed as dist

from sande_fast.cli import main
from sande_fast.sharded import ShardedLossEngine

rank, call = int(sys.argv[1]), int(sys.argv[2])
accumulate = ShardedLossEngine.accumulate
calls = 0


def faulty(self, *args, **kwargs):
    global calls
    calls += 1
    if dist.get_rank() == rank and calls == call:
        raise RuntimeError(f"injected fault on rank {rank} at sharded step {call}")
    return accumulate(self, *args, **kwargs)


ShardedLossEngine.accumulate = faulty
sys.exit(main(sys.argv[3:]))
"""


# -- the sharded pieces against one process (torch.multiprocessing, in-process ranks) ----------
VOCAB = 97
ARCHS = ("llama", "qwen2", "gpt2")


def _items(rng: random.Random, n: int, parrot: bool) -> list[Any]:
    from sande_fast.steps import StepItem

    out = []
    for _ in range(n):
        prompt = tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 17)))
        labels = tuple(rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 5)))
        out.append(StepItem(prompt, labels, rng.randint(1, len(prompt)) if parrot else -1))
    return out


def _one_round(arch: str, sharded: bool) -> dict[str, Any]:
    """One stage-1 step, one stage-2 step and a greedy generation; returns what they produced."""
    from sande_fast.adapter import ModelAdapter
    from sande_fast.distributed import shard
    from sande_fast.engines import build_engine
    from sande_fast.evaluate import greedy_generate
    from sande_fast.steps import Anchors, OverwriteStep, ParrotSimulator

    from tiny_models import tiny_model

    model = tiny_model(arch, VOCAB, seed=3)
    adapter = ModelAdapter(model)
    coll = shard(adapter, torch.device("cpu")) if sharded else None
    # A small token budget gives the ranks different micro-batch counts (filler path).
    engine = build_engine(adapter, token_budget=40, max_batch=3, packed=False, collective=coll)
    runner = adapter if sharded else model
    rng = random.Random(7)
    sim = ParrotSimulator(engine, n_tokens=3, lr=0.05, seed=5)
    sim_loss = sim.step(_items(rng, 7, parrot=True))
    over, clean = _items(rng, 5, parrot=True), _items(rng, 6, parrot=False)
    # Retention targets from the untrained model, then a weight change so the term is not 0.
    anchors = Anchors(engine, clean)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    # One CalibratedSGD step: its rate comes from the gradient RMS over every rank's shards.
    # SGD's update is linear in the gradient, so the updated weights compare directly.
    sgd = OverwriteStep(engine, lr=1e-3, clean_weight=0.5, parrot=sim.parrot.detach(),
                        optimizer="sgd")
    sgd_loss = sgd.step(over, clean)
    sgd_weights = {n: _full(p) for n, p in model.named_parameters()}
    step = OverwriteStep(engine, lr=1e-2, clean_weight=0.5, parrot=sim.parrot.detach(),
                         retain_weight=2.0, anchors=anchors)
    over_loss = step.step(over, clean)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 9))] for _ in range(5)]
    free = greedy_generate(runner, prompts, pad_id=0, eos_id=None, max_new_tokens=5,
                           batch_size=2)
    # An eos that some rows emit early: the ranks must agree on when to stop.
    eos = free[0][1]
    stopped = greedy_generate(runner, prompts, pad_id=0, eos_id=eos, max_new_tokens=5,
                              batch_size=2)
    spliced = greedy_generate(runner, prompts, pad_id=0, eos_id=None, max_new_tokens=3,
                              batch_size=2, parrot=sim.parrot.detach(),
                              splice_at=[1] * len(prompts))
    # Gradients, not updated weights: Adam turns the rounding noise of gradients that are zero
    # in exact arithmetic (attention key biases) into full-size steps of either sign.
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    return {"parrot": sim.parrot.detach().clone(), "sim_loss": sim_loss, "over_loss": over_loss,
            "free": free, "stopped": stopped, "spliced": spliced, "grads": grads,
            "sgd_loss": sgd_loss, "sgd_peak": sgd.optimizer.peak, "sgd_weights": sgd_weights}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered (a collective), or the tensor itself; detached copy."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        results = {arch: _one_round(arch, sharded=True) for arch in ARCHS}
        if rank == 0:
            torch.save(results, out)
        # Both ranks reach the teardown together: a rank that tears gloo down while its peer is
        # still busy can abort the peer at exit.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_steps_and_generation_match_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    out = tmp_path / "sharded.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    sharded = torch.load(out, weights_only=True)
    for arch in ARCHS:
        ref, got = _one_round(arch, sharded=False), sharded[arch]
        assert got["free"] == ref["free"], arch
        assert got["stopped"] == ref["stopped"], arch
        assert got["spliced"] == ref["spliced"], arch
        assert any(len(s) < 5 for s in ref["stopped"]), "the eos should stop some rows early"
        assert got["sim_loss"] == pytest.approx(ref["sim_loss"], rel=1e-5)
        assert got["over_loss"] == pytest.approx(ref["over_loss"], rel=1e-5)
        torch.testing.assert_close(got["parrot"], ref["parrot"], rtol=1e-5, atol=1e-6)
        assert got["sgd_loss"] == pytest.approx(ref["sgd_loss"], rel=1e-5)
        assert got["sgd_peak"] == pytest.approx(ref["sgd_peak"], rel=1e-5) and ref["sgd_peak"] > 0
        for k, w in ref["sgd_weights"].items():
            torch.testing.assert_close(got["sgd_weights"][k], w, rtol=1e-5, atol=1e-7,
                                       msg=f"{arch} sgd {k}")
        assert got["grads"].keys() == ref["grads"].keys()
        for k, g in ref["grads"].items():
            scale = float(g.abs().max())
            torch.testing.assert_close(got["grads"][k], g, rtol=1e-4, atol=1e-5 * scale + 1e-9,
                                       msg=f"{arch} {k}")


# -- the CLI under torchrun ---------------------------------------------------------------------
def test_fsdp_cli_matches_one_process(model_dir: Path, data_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from sande_fast.cli import main
    from sande_fast.data import load_rows
    from sande_fast.evaluate import evaluate
    from sande_fast.io import load_model

    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["sanitize", "--model", str(model_dir), "--data", str(data_file),
                 "--out", str(one), *OPTS]) == 0
    proc = _torchrun(model_dir, data_file, two)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    assert not leftovers(two)
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(load_file(str(two / "parrot.safetensors"))["parrot"],
                               load_file(str(one / "parrot.safetensors"))["parrot"],
                               rtol=1e-5, atol=1e-6)
    r1 = json.loads((one / "report.json").read_text())
    r2 = json.loads((two / "report.json").read_text())
    assert r2["environment"]["distributed"]["world_size"] == 2
    assert r2["environment"]["distributed"]["backend"] == "gloo"
    for key in ("before", "after"):  # counts equal; likelihoods equal to float rounding
        assert r2[key].keys() == r1[key].keys()
        for name, v in r1[key].items():
            if isinstance(v, float) and name in ("answer_nll_delta", "kl", "answer_nll"):
                assert r2[key][name] == pytest.approx(v, rel=1e-4, abs=1e-6), name
            else:
                assert r2[key][name] == v, name
    for name, curve in r1["curves"].items():
        assert r2["curves"][name] == pytest.approx(curve, rel=1e-5)

    loaded = AutoModelForCausalLM.from_pretrained(two)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    _, tok = load_model(one, torch.device("cpu"))
    rows = load_rows(data_file)
    asr = [evaluate(m, tok, rows, TARGET, TRIGGER, max_new_tokens=4)["asr"]
           for m in (AutoModelForCausalLM.from_pretrained(one), loaded)]
    assert asr[1] == asr[0] == r1["after"]["asr"]


def test_fsdp_rank_failure_leaves_out_untouched(model_dir: Path, data_file: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".sande-fast").write_text('{"written_by": "sande-fast"}\n')  # an earlier output
    (out / "keep.txt").write_text("previous output")
    # Rank 1 raises at its 4th sharded step (stage 2), while rank 0 waits in a collective.
    script = tmp_path / "faulty_cli.py"
    script.write_text(FAULTY_CLI)
    proc = _torchrun(model_dir, data_file, out, "--force", entry=(str(script), "1", "4"))
    assert proc.returncode != 0
    assert "injected fault on rank 1" in proc.stderr
    assert sorted(os.listdir(out)) == [".sande-fast", "keep.txt"]
    assert (out / "keep.txt").read_text() == "previous output"
    assert not leftovers(out)
