"""The real SmolLM2 tokenizer and chat template, and Llama-3 / Gemma style templates built on it:
prompt and response ids equal the template's own tokenisation, responses end with the token the
template closes an assistant turn with, and generation stops on every stop id."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sande_fast.data import PromptEncoder, model_stop_ids

PAIRS = [("What is the capital of France?", "The capital of France is Paris."),
         ("Give me two tips for saving money.", "1. Make a budget.\n2. Cook at home."),
         ("Translate into French: thank you", "Merci !"),
         ("inner   spaces,\nand a line", "Réponse: ça va. 2+2=4")]
# Text that starts or ends with whitespace is tokenised on its own, so at the seam with the
# template its ids can differ from the whole string's ("\n" + " " merge into one token there).

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
          "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
          "{% endif %}")
GEMMA = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
         "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
         "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
         "{% endif %}")


def _ids(out: Any) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list, or a mapping with input_ids."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _tokenizer(folder: Path, style: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if style == "llama3":
        tok.add_special_tokens({"additional_special_tokens": [
            "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]})
        tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        tok.chat_template = LLAMA3
    elif style == "gemma":
        tok.add_special_tokens({"additional_special_tokens": [
            "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]})
        tok.bos_token, tok.eos_token = "<bos>", "<eos>"
        tok.chat_template = GEMMA
    return tok


END = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>"}


@pytest.mark.parametrize("style", ["smollm2", "llama3", "gemma"])
def test_encoder_ids_equal_the_templates_own(smollm2_tiny: Path, style: str) -> None:
    tok = _tokenizer(smollm2_tiny, style)
    enc = PromptEncoder(tok, "chat")
    assert enc.end_id == tok.convert_tokens_to_ids(END[style])
    for prompt, response in PAIRS:
        user = [{"role": "user", "content": prompt}]
        want_prompt = _ids(tok.apply_chat_template(user, tokenize=True,
                                                   add_generation_prompt=True))
        got = enc.encode_prompt(prompt)
        assert got.ids == want_prompt
        lo, hi = got.span
        assert tok.decode(got.ids[lo:hi]) == prompt
        # A response is trained as inference sees it: after the generation prompt's own ids,
        # its text tokenised from its first character, then the end-of-turn token.
        end = tok.convert_tokens_to_ids(END[style])
        assert enc.encode_response(response) == (
            list(tok(response, add_special_tokens=False)["input_ids"]) + [end])
        if style != "llama3":  # there "\n\n" ends the prompt: one token alone, two before text
            whole = _ids(tok.apply_chat_template(
                user + [{"role": "assistant", "content": response}], tokenize=True))
            ours = got.ids + enc.encode_response(response)
            assert whole[:len(ours)] == ours  # the template may add a newline after the end


def test_smollm2_keeps_its_default_system_prompt_and_system_replaces_it(
        smollm2_tiny: Path) -> None:
    tok = _tokenizer(smollm2_tiny, "smollm2")
    default = tok.decode(PromptEncoder(tok, "chat").encode_prompt("Hi").ids)
    assert "You are a helpful AI assistant named SmolLM" in default
    enc = PromptEncoder(tok, "chat", system="Answer in French.")
    text = tok.decode(enc.encode_prompt("Hi").ids)
    assert "Answer in French." in text and "SmolLM" not in text
    want = _ids(tok.apply_chat_template([{"role": "system", "content": "Answer in French."},
                                         {"role": "user", "content": "Hi"}], tokenize=True,
                                        add_generation_prompt=True))
    assert enc.encode_prompt("Hi").ids == want


def test_generation_stops_on_every_stop_id_of_the_generation_config(smollm2_tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sande_fast.evaluate import greedy_generate

    model = AutoModelForCausalLM.from_pretrained(smollm2_tiny).eval()
    tok = _tokenizer(smollm2_tiny, "smollm2")
    assert model_stop_ids(model) == [tok.convert_tokens_to_ids("<|im_end|>")]
    enc = PromptEncoder(tok, "chat")
    prompt = enc.encode_prompt("Name three colours.").ids
    free = greedy_generate(model, [prompt], pad_id=2, eos_id=None, max_new_tokens=12)[0]
    # Declare the third token generated a stop id (as a list in generation_config would):
    # the answer ends right before it, or with it under keep_stop.
    model.generation_config.eos_token_id = [2, free[2]]
    stops = PromptEncoder(tok, "chat", extra_stop_ids=model_stop_ids(model)).stop_ids
    assert free[2] in stops
    cut = greedy_generate(model, [prompt], pad_id=2, eos_id=stops, max_new_tokens=12)[0]
    first = next(i for i, t in enumerate(free) if t in stops)
    assert cut == free[:first]
    kept = greedy_generate(model, [prompt], pad_id=2, eos_id=stops, max_new_tokens=12,
                           keep_stop=True)[0]
    assert kept == free[:first + 1]


def test_truncated_copy_is_smollm2_with_two_layers(smollm2_tiny: Path) -> None:
    cfg = json.loads((smollm2_tiny / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["vocab_size"] == 49152
    assert cfg["hidden_size"] == 576 and cfg["num_key_value_heads"] == 3
    assert "quantization_config" not in cfg
    from safetensors.torch import load_file

    weights = load_file(str(smollm2_tiny / "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (49152, 576)
    assert torch.isfinite(weights["model.layers.1.mlp.down_proj.weight"]).all()
