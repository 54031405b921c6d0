"""Model adapter: the few pieces of a Hugging Face causal LM the fast path needs.

The fast path never calls the LM head through the model: it takes the final hidden states from the
base model and projects only the supervised rows itself. That needs the base model, the input
embedding, the output projection (tied or not) and any logit transform the architecture applies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ModelAdapter", "UnsupportedModelError"]


class UnsupportedModelError(ValueError):
    """The fast path cannot reproduce this model's logits exactly (use the plain path)."""


@dataclass
class ModelAdapter:
    """Access to a causal LM's embedding, base model and LM head.

    Args:
        model: a ``PreTrainedModel`` with a causal-LM head (``*ForCausalLM``, ``GPT2LMHeadModel``).
    """

    model: nn.Module

    def __post_init__(self) -> None:
        m = self.model
        self.base: nn.Module = getattr(m, "base_model", None)
        if self.base is None or self.base is m:
            raise UnsupportedModelError(f"{type(m).__name__} has no separate base model")
        self.embed: nn.Module = m.get_input_embeddings()
        head = m.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise UnsupportedModelError(
                f"{type(m).__name__}: LM head is {type(head).__name__}, not a linear layer")
        self.head: nn.Linear = head
        self.logit_scale = _logit_scale(getattr(m, "config", None))

    @property
    def hidden_size(self) -> int:
        return self.head.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def embed_dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def hidden_states(self, inputs_embeds: torch.Tensor,
                      position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final (normed) hidden states ``[B, L, H]`` of the base model, no logits."""
        out = self.base(inputs_embeds=inputs_embeds, position_ids=position_ids,
                        attention_mask=attention_mask, use_cache=False)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _logit_scale(config: Any) -> float:
    """The factor the architecture multiplies logits by; refuses transforms that are not a scale."""
    if config is None:
        return 1.0
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        raise UnsupportedModelError(
            f"{type(config).__name__} soft-caps its logits (final_logit_softcapping={cap}); "
            "the fused loss does not implement that: use the plain path (fast=False)")
    scale = 1.0
    if getattr(config, "logit_scale", None):  # Cohere-style: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):  # Granite-style: logits / logits_scaling
        scale /= float(config.logits_scaling)
    return scale
