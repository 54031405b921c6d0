"""The model adapter: typed forward requests, prefix keys and values, the last-layer tail."""
from __future__ import annotations

import pytest
import torch

from sande_fast.adapter import ModelAdapter

from step_helpers import VOCAB
from tiny_models import tiny_model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_states_stop_in_the_last_layer_with_full_keys_and_values(arch: str) -> None:
    from transformers import DynamicCache

    from sande_fast.adapter import ModelAdapter, cache_argument, cache_tensors

    model = tiny_model(arch, VOCAB, seed=4)
    ad = ModelAdapter(model)
    ids = torch.tensor([[5, 9, 13, 2, 7], [11, 3, 8, 0, 0]])
    full = DynamicCache()
    with torch.no_grad():
        ad.base(inputs_embeds=ad.embed(ids), use_cache=True, **{cache_argument(ad.base): full})
    ref = cache_tensors(full)
    got = ad.prefix_states(ids)
    assert len(got) == len(ref) == model.config.num_hidden_layers
    for (k, v), (rk, rv) in zip(got, ref):
        assert torch.equal(k, rk) and torch.equal(v, rv)


def test_last_layer_tail_steps_aside_for_activation_checkpointing() -> None:
    from sande_fast.adapter import ModelAdapter

    model = tiny_model("llama", VOCAB, seed=1)
    enable = getattr(model, "activation_checkpointing_enable", None)
    (enable or model.gradient_checkpointing_enable)()
    model.train()
    ad = ModelAdapter(model)
    emb = ad.embed(torch.tensor([[5, 6, 7, 8, 9, 10]]))
    assert ad._last_layer_tail(emb, None, None, None, 3) is None


def test_forward_dispatches_on_the_request_type() -> None:
    import random

    from sande_fast.adapter import Embed, FastLoss, HeadLoss, ModelCall, Prefix, SupervisedHidden
    from sande_fast.inputs import token_rows

    from step_helpers import make_items

    model = tiny_model("llama", VOCAB, seed=2)
    ad = ModelAdapter(model)
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    assert torch.equal(ad(Embed(ids)), ad.embed(ids))
    with torch.no_grad():
        assert torch.equal(ad(ModelCall({"input_ids": ids})).logits, model(input_ids=ids).logits)
        for (k, v), (rk, rv) in zip(ad(Prefix(ids)), ad.prefix_states(ids)):
            assert torch.equal(k, rk) and torch.equal(v, rv)
    items = make_items(random.Random(1), 3, parrot=True)
    rows = token_rows(items, torch.randn(2, 32), packed=False, pad_id=0,
                      device=torch.device("cpu"), last_layer_tail=False)
    h = ad(SupervisedHidden(rows, "torch"))
    assert h.shape == (rows.labels.numel(), 32)
    split = ad(HeadLoss(h, rows.labels, 7.0, "torch"))
    assert torch.equal(ad(FastLoss(rows, 7.0, "torch")), split)
    with pytest.raises(TypeError, match="request"):
        ad("embed")


def _tiny_gemma3() -> torch.nn.Module:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    return Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=97, hidden_size=36, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        max_position_embeddings=128, sliding_window=64)).float().eval()


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_embedding_rows_are_what_the_embedding_module_feeds_the_decoder(arch: str) -> None:
    # Gemma scales token rows by sqrt(hidden) inside its embedding's forward: parrots start
    # from, and are capped at the norm of, the rows as that forward returns them.
    from tiny_models import tiny_model

    model = _tiny_gemma3() if arch == "gemma3" else tiny_model("llama", 97)
    adapter = ModelAdapter(model)
    embed = model.get_input_embeddings()
    index = torch.tensor([5, 17, 96, 0])
    with torch.no_grad():
        want = embed(index)
        every = embed(torch.arange(97))
    assert torch.allclose(adapter.embedding_rows(index), want)
    assert adapter.max_embedding_norm() == pytest.approx(float(every.norm(dim=1).max()),
                                                         rel=1e-6)
    assert adapter.embed_scale() == (pytest.approx(36 ** 0.5) if arch == "gemma3" else 1.0)


def test_gemma3_fast_loss_and_parrot_gradient_match_the_plain_path() -> None:
    import random

    from sande_fast.engine import LossEngine
    from sande_fast.steps import frozen
    from step_helpers import close, make_items

    model = _tiny_gemma3()
    items = make_items(random.Random(3), 6, parrot=True)
    parrot = ModelAdapter(model).embedding_rows(torch.tensor([4, 9]))
    out = []
    for eng in (LossEngine(model, packed=False), LossEngine(model, fast=False)):
        p = parrot.clone().requires_grad_()
        with frozen(model):
            value = eng.accumulate(items, p, 10.0)
        out.append((value, p.grad))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
    close(out[0][1], out[1][1])
