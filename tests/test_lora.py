"""--train lora: LoRA layers on both loss paths, only adapters train, PEFT's adapter format both
ways (what we write loads with peft; what peft writes loads as --model), clear refusals."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from conftest import TARGET, TRIGGER, sanitize_argv
from step_helpers import VOCAB, close, grads, make_items
from tiny_models import tiny_model

from sande_fast import sanitize
from sande_fast.cli import main
from sande_fast.engine import LossEngine
from sande_fast.evaluate import evaluate
from sande_fast.io import load_model
from sande_fast.lora import (DEFAULT_MODULES, LoraLinear, attach_lora, lora_layers, merge_lora,
                             save_adapter)
from sande_fast.options import SanitizeConfig
from sande_fast.recipe import Sanitizer, _Snapshot
from sande_fast.steps import Anchors, OverwriteStep

peft = pytest.importorskip("peft")

LORA = ["--train", "lora", "--lora-rank", "4"]
CPU = torch.device("cpu")


def _randomise_b(model: torch.nn.Module, seed: int = 0) -> None:
    """B starts at zero (so A gets no gradient); give it values so both matrices are tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(0.1 * torch.randn(layer.lora_B.weight.shape, generator=g))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("retain", [0.0, 5.0])
def test_fast_and_plain_paths_give_the_same_lora_gradients(arch: str, retain: float) -> None:
    model = tiny_model(arch, VOCAB, seed=2)
    modules = DEFAULT_MODULES.split(",") if arch == "llama" else ["c_attn", "c_proj", "c_fc"]
    attach_lora(model, modules, rank=4, alpha=8.0)
    _randomise_b(model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    rng = random.Random(1)
    over, clean = make_items(rng, 6, parrot=True), make_items(rng, 7, parrot=False)
    parrot = torch.randn(2, model.config.hidden_size)
    engines = [LossEngine(model, fast=fast, token_budget=60, max_batch=4, packed=False)
               for fast in (False, True)]
    anchors = [Anchors(e, clean) if retain else None for e in engines]
    out = []
    for eng, anc in zip(engines, anchors):
        model.zero_grad(set_to_none=True)
        step = OverwriteStep(eng, lr=1e-3, clean_weight=0.7, parrot=parrot,
                             retain_weight=retain, anchors=anc)
        assert all(p.requires_grad for p in step.params) and len(step.params) == 2 * len(
            lora_layers(model))  # the optimizer holds the LoRA matrices only
        step.loss(over, clean).backward()
        out.append(grads(model))
    g0, g1 = out
    assert set(g0) == set(g1) and g0 and all("lora_" in k for k in g0)
    assert any("lora_A" in k for k in g0)
    for k in g0:
        close(g1[k], g0[k])


def test_only_the_adapters_change_and_the_round_guard_restores_them(tokenizer, model_dir,
                                                                     data_file) -> None:
    model, tok = load_model(model_dir, CPU, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = sanitize(model, tok, str(data_file), TARGET, TRIGGER, "osft", train="lora",
                   lora_rank=4, overwrite_steps=3, eval_rows=4, batch_size=2, max_new_tokens=4,
                   quiet=True, device="cpu")
    layers = lora_layers(res.model)
    assert len(layers) == 2 * 7  # two decoder layers, seven projections each
    after = res.model.state_dict()
    for k, v in before.items():
        lora_key = k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        key = k if k in after else lora_key
        assert torch.equal(after[key], v), k  # bit-identical base weights
    assert any(float(layer.lora_B.weight.detach().abs().max()) > 0 for layer in layers.values())
    info = res.report["lora"]
    assert res.report["config"]["train"] == "lora" and info["rank"] == 4
    assert info["trainable_params"] == sum(l.lora_A.weight.numel() + l.lora_B.weight.numel()
                                           for l in layers.values())
    assert info["trainable_params"] < info["total_params"] / 5
    # The round guard's snapshot (a state_dict copy) undoes a round's adapter training.
    snap = _Snapshot(res.model)
    first = next(iter(layers.values()))
    saved = first.lora_B.weight.detach().clone()
    with torch.no_grad():
        first.lora_B.weight.add_(1.0)
    snap.restore()
    assert torch.equal(first.lora_B.weight, saved)


def test_lora_under_rounds_auto_with_the_guard(tokenizer, model_dir, data_file) -> None:
    model, tok = load_model(model_dir, CPU, progress=False)
    res = sanitize(model, tok, str(data_file), TARGET, TRIGGER, "sande", train="lora",
                   lora_rank=2, simulate_steps=2, overwrite_steps=2, max_rounds=2,
                   probe_threshold=0.0, eval_rows=4, batch_size=2, max_new_tokens=4,
                   quiet=True, device="cpu", guard_metric="agreement")
    assert res.report["rounds"] and lora_layers(res.model)


def test_the_saved_adapter_loads_with_peft_and_matches_the_run(tokenizer, model_dir, data_file,
                                                              tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = load_model(model_dir, CPU, progress=False)
    cfg = SanitizeConfig(train="lora", lora_rank=4, overwrite_steps=5, overwrite_lr=0.05,
                         eval_rows=8, batch_size=2, max_new_tokens=4, quiet=True, device="cpu")
    run = Sanitizer(model, tok, "osft", TARGET, TRIGGER, cfg)
    res = run.run(str(data_file))
    save_adapter(res.model, tmp_path / "ad", tok)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "ad").iterdir()}
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    loaded = PeftModel.from_pretrained(base, tmp_path / "ad").eval()
    ids = torch.tensor([list(range(3, 40))])
    ours, theirs = _logits(res.model, ids), _logits(loaded, ids)
    assert (ours - _logits(AutoModelForCausalLM.from_pretrained(model_dir), ids)).abs().max() > 1e-4
    close(theirs, ours, rtol=1e-5)
    c = run.cfg
    kw = dict(max_new_tokens=c.max_new_tokens, batch_size=max(c.batch_size * 4, 32),
              trigger_position=c.trigger_position, seed=c.seed, encoder=run.encoder)
    m = evaluate(loaded.get_base_model(), tok, run.eval_rows, run.eval_target,
                 run.eval_trigger, **kw)
    assert m["asr"] == res.report["after"]["asr"]
    assert m["clean_accuracy"] == res.report["after"]["clean_accuracy"]


def test_cli_writes_a_peft_adapter_folder(model_dir, data_file, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    assert main(sanitize_argv(model_dir, data_file, out, *LORA, "--overwrite-lr", "0.05",
                              method="osft") + ["--trigger", TRIGGER]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "report.json"} <= names
    assert "config.json" not in names and "model.safetensors" not in names
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["peft_type"] == "LORA"
    assert Path(conf["base_model_name_or_path"]) == model_dir.resolve()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["train"] == "lora" and report["lora"]["trainable_params"] > 0
    # peft reads the folder; our loader reads it as --model and gives the same logits.
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    ours, _ = load_model(out, CPU, progress=False)
    ids = torch.tensor([list(range(3, 30))])
    close(_logits(ours, ids), _logits(loaded.eval(), ids), rtol=1e-5)


@pytest.fixture
def peft_adapter(model_dir: Path, tmp_path: Path) -> Path:
    """An adapter written by peft itself (B randomised, so it changes the model)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    pm = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                         task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    d = tmp_path / "peft_adapter"
    pm.save_pretrained(d)
    conf = json.loads((d / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(model_dir)
    (d / "adapter_config.json").write_text(json.dumps(conf))
    return d


def test_a_peft_adapter_folder_loads_as_model(model_dir, peft_adapter, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir),
                                    peft_adapter).eval()
    model, tok = load_model(peft_adapter, CPU, progress=False)
    assert len(lora_layers(model)) == 4 and isinstance(
        model.model.layers[0].self_attn.q_proj, LoraLinear)
    ids = torch.tensor([list(range(3, 30))])
    close(_logits(model, ids), _logits(ref, ids), rtol=1e-5)
    wrapped = _logits(model, ids)
    assert merge_lora(model) == 4 and not lora_layers(model)
    close(_logits(model, ids), wrapped, rtol=1e-5)
    # --base-model overrides the config's base; a base that is not a local folder is refused.
    load_model(peft_adapter, CPU, progress=False, base_model=str(model_dir))
    conf = json.loads((peft_adapter / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = "someone/some-hub-model"
    (peft_adapter / "adapter_config.json").write_text(json.dumps(conf))
    from sande_fast.errors import BadInputError

    with pytest.raises(BadInputError, match="--base-model"):
        load_model(peft_adapter, CPU, progress=False)


def test_sanitize_continues_or_merges_an_adapter_given_as_model(model_dir, data_file,
                                                                peft_adapter, tmp_path) -> None:
    out = tmp_path / "lora_out"
    assert main(sanitize_argv(peft_adapter, data_file, out, "--train", "lora")) == 0
    conf = json.loads((out / "adapter_config.json").read_text())
    # The adapter keeps its own shape and base, so it still loads on the same base model.
    assert conf["r"] == 2 and sorted(conf["target_modules"]) == ["q_proj", "v_proj"]
    assert Path(conf["base_model_name_or_path"]) == model_dir.resolve()
    report = json.loads((out / "report.json").read_text())
    assert report["lora"]["continued_adapter"] is True
    full = tmp_path / "full_out"
    assert main(sanitize_argv(peft_adapter, data_file, full)) == 0
    names = {p.name for p in full.iterdir()}
    assert "config.json" in names and "adapter_config.json" not in names
    model, _ = load_model(full, CPU, progress=False)
    assert not lora_layers(model) and not any("lora_" in k for k in model.state_dict())


@pytest.mark.parametrize("modules, says", [("q_proj,nope", "no module nope"),
                                           ("lm_head", "LM head"),
                                           ("embed_tokens", "not a linear layer")])
def test_bad_lora_modules_exit_2_with_one_line(model_dir, data_file, tmp_path, capsys,
                                               modules: str, says: str) -> None:
    out = tmp_path / "out"
    code = main(sanitize_argv(model_dir, data_file, out, "--train", "lora", "--lora-modules",
                              modules))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_adapter_input_refuses_pickles_and_remote_code(model_dir, peft_adapter,
                                                       data_file, tmp_path, capsys) -> None:
    assert main(sanitize_argv(peft_adapter, data_file, tmp_path / "o", "--trust-remote-code")) == 2
    assert "trust-remote-code" in capsys.readouterr().err
    (peft_adapter / "adapter_model.safetensors").rename(peft_adapter / "adapter_model.bin")
    assert main(sanitize_argv(peft_adapter, data_file, tmp_path / "o")) == 2
    assert "only safetensors" in capsys.readouterr().err
