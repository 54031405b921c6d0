"""Model adapter: the few pieces of a Hugging Face causal LM the fast path needs.

The fast path never calls the LM head through the model: it takes the final hidden states from the
base model and projects only the supervised rows itself. That needs the base model, the input
embedding, the output projection (tied or not) and any logit transform the architecture applies.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Union

import torch
from torch import nn

from .inputs import PrefixedRows, Rows
from .splice import splice_parrot

__all__ = ["ModelAdapter", "UnsupportedModelError", "Embed", "Prefix", "SupervisedHidden",
           "HeadLoss", "FastLoss", "ModelCall", "Request", "accepts_argument", "cache_argument",
           "cache_tensors", "context_length"]

# A sharded (FSDP2) model unshards its root parameters (embedding, final norm, LM head) only
# inside the root module's forward. The fast loss therefore runs as the forward of this adapter,
# which holds the model as a submodule: shard the adapter as the root and it just works. What the
# forward runs is told by the type of its one argument (the requests below); FSDP's
# mixed-precision cast reaches the tensors inside them.


@dataclass(frozen=True)
class Embed:
    """The input embedding ``[*, H]`` of token ids ``ids`` ``[*]``."""

    ids: torch.Tensor


@dataclass(frozen=True)
class Prefix:
    """Per-layer keys and values of right-padded token rows ``ids`` ``[B, P]``, no graph unless
    ``graph`` (:meth:`ModelAdapter.prefix_states`)."""

    ids: torch.Tensor
    graph: bool = False


@dataclass(frozen=True)
class SupervisedHidden:
    """Final hidden states of the supervised rows of ``inputs``
    (:meth:`ModelAdapter.supervised_hidden`)."""

    inputs: Rows
    backend: str = "auto"


@dataclass(frozen=True)
class HeadLoss:
    """Summed cross-entropy of ``hidden`` ``[R, H]`` against ``labels`` ``[R]`` through the LM
    head, divided by ``normalizer`` (:meth:`ModelAdapter.head_loss`); with ``unlikely``, the
    summed unlikelihood ``-log(1 - p(label))`` instead (:meth:`ModelAdapter.head_unlikelihood`)."""

    hidden: torch.Tensor
    labels: torch.Tensor
    normalizer: float
    backend: str = "auto"
    unlikely: bool = False


@dataclass(frozen=True)
class FastLoss:
    """The fast loss of one micro-batch: :class:`SupervisedHidden` then :class:`HeadLoss`
    against ``inputs.labels`` (:meth:`ModelAdapter.fast_loss`)."""

    inputs: Rows
    normalizer: float
    backend: str = "auto"


@dataclass(frozen=True)
class ModelCall:
    """The Hugging Face model's own forward with keyword arguments ``kwargs`` (generation)."""

    kwargs: dict[str, Any]


Request = Union[Embed, Prefix, SupervisedHidden, HeadLoss, FastLoss, ModelCall]


class UnsupportedModelError(ValueError):
    """The fast path cannot reproduce this model's logits exactly (use the plain path)."""


class ModelAdapter(nn.Module):
    """Access to a causal LM's embedding, base model and LM head, and the fast loss as forward.

    Args:
        model: a ``PreTrainedModel`` with a causal-LM head (``*ForCausalLM``, ``GPT2LMHeadModel``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        m = model
        base = getattr(m, "base_model", None)
        if base is None or base is m:
            raise UnsupportedModelError(f"{type(m).__name__} has no separate base model")
        head = m.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise UnsupportedModelError(
                f"{type(m).__name__}: LM head is {type(head).__name__}, not a linear layer")
        self.logit_scale = _logit_scale(getattr(m, "config", None))
        # Set by sande_fast.distributed when the model is sharded: the process group helpers the
        # loss engine and generation use to split work across ranks. None in one process.
        self.collective: Any = None

    # The parts are looked up on each use (not stored as submodules twice).
    @property
    def base(self) -> nn.Module:
        return self.model.base_model

    @property
    def embed(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def hidden_states(self, inputs_embeds: torch.Tensor,
                      position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None,
                      past_key_values: Any = None) -> torch.Tensor:
        """Final (normed) hidden states ``[B, L, H]`` of the base model, no logits."""
        kwargs: dict[str, Any] = {"use_cache": False}
        if past_key_values is not None:
            kwargs = {cache_argument(self.base): past_key_values, "use_cache": True}
        out = self.base(inputs_embeds=inputs_embeds, position_ids=position_ids,
                        attention_mask=attention_mask, **kwargs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def prefix_states(self, ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                      graph: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer keys and values ``[B, kv_heads, P, head_dim]`` of token rows ``ids``
        ``[B, P]`` (right-padded rows, or one packed row with restarting ``position_ids``),
        computed without a graph (``graph``: with one, for a prefix of a model that trains).

        Right-padded rows need no attention mask: under causal attention a real token never sees
        the pads that follow it, and every pad row sees at least the first column, so no row is
        fully masked. Whoever attends to these states masks the pads out.
        """
        cache = _stopping_cache()
        cache.stop_at = self.num_layers - 1  # only keys and values are needed
        with contextlib.nullcontext() if graph else torch.no_grad():
            try:
                self.base(inputs_embeds=self.embed(ids), position_ids=position_ids,
                          use_cache=True, **{cache_argument(self.base): cache})
            except _StopForward:
                pass
        return cache_tensors(cache)

    def embed_scale(self) -> float:
        """The factor the input embedding's forward multiplies its rows by: ``sqrt(hidden)`` for
        the Gemma family (``embed_scale``), 1 for a plain ``nn.Embedding``. Token rows enter the
        decoder scaled, so a parrot lives at that scale too."""
        scale = getattr(self.embed, "embed_scale", None)
        return 1.0 if scale is None else float(scale)

    def embedding_rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the input embeddings as the decoder receives them (the embedding's
        scale applied, detached), also when the matrix is sharded."""
        weight = self.embed.weight.detach()
        if self.collective is not None:
            rows = self.collective.embedding_rows(weight, index)
        else:
            rows = weight[index.to(weight.device)]
        scale = self.embed_scale()
        return rows if scale == 1.0 else rows * scale

    def max_embedding_norm(self) -> float:
        """Largest L2 norm of an input embedding row as the decoder receives it (the
        embedding's scale applied), also when the matrix is sharded."""
        weight = self.embed.weight.detach()
        local = weight.to_local() if hasattr(weight, "to_local") else weight
        value = float(local.float().norm(dim=1).max()) if local.numel() else 0.0
        value = self.collective.max_float(value) if self.collective is not None else value
        return value * self.embed_scale()

    def forward(self, request: Request) -> Any:
        """Runs ``request``; every use of the root parameters goes through here.

        Under FSDP2 the root's own parameters (embedding, final norm, LM head) are gathered only
        around the root module's forward, so generation calls this too instead of the model.

        Args:
            request: :class:`Embed`, :class:`Prefix`, :class:`SupervisedHidden`,
                :class:`HeadLoss`, :class:`FastLoss` or :class:`ModelCall`.
        """
        if isinstance(request, FastLoss):
            return self.fast_loss(request.inputs, request.normalizer, request.backend)
        if isinstance(request, Embed):
            return self.embed(request.ids)
        if isinstance(request, Prefix):
            return self.prefix_states(request.ids, graph=request.graph)
        if isinstance(request, SupervisedHidden):
            return self.supervised_hidden(request.inputs, request.backend)
        if isinstance(request, HeadLoss):
            if request.unlikely:
                return self.head_unlikelihood(request.hidden, request.labels,
                                              request.normalizer)
            return self.head_loss(request.hidden, request.labels, request.normalizer,
                                  request.backend)
        if isinstance(request, ModelCall):
            return self.model(**request.kwargs)
        raise TypeError(f"unknown adapter request {type(request).__name__}")

    def fast_loss(self, inputs: Rows, normalizer: float, backend: str = "auto") -> torch.Tensor:
        """The fast loss of one micro-batch (call the module with :class:`FastLoss`, not this,
        when it is sharded): :meth:`supervised_hidden` then :meth:`head_loss`.

        Args:
            inputs: the micro-batch (its ``labels`` are the targets).
            normalizer: the summed cross-entropy is divided by this.
            backend: kernel backend of the splice and the fused loss.

        Returns:
            0-dim fp32 loss.
        """
        h = self.supervised_hidden(inputs, backend)
        return self.head_loss(h, inputs.labels, normalizer, backend)

    def supervised_hidden(self, inputs: Rows, backend: str = "auto") -> torch.Tensor:
        """Final hidden states ``[R, H]`` of the supervised rows of one micro-batch.

        Args:
            inputs: token rows (:class:`~sande_fast.inputs.Rows`), or the rest of each
                sequence after a prefix that runs without a graph
                (:class:`~sande_fast.inputs.PrefixedRows`: ``prefix_ids`` run here, once,
                or ``prefix_kv`` are their keys and values from :meth:`prefix_states`, which
                may carry a graph).
            backend: kernel backend of the parrot splice.
        """
        position_ids, supervised_rows = inputs.position_ids, inputs.supervised_rows
        prefix_ids = prefix_kv = attention_mask = None
        if isinstance(inputs, PrefixedRows):
            prefix_ids, prefix_kv = inputs.prefix_ids, inputs.prefix_kv
            attention_mask = inputs.attention_mask
        emb = splice_parrot(self.embed(inputs.ids), inputs.parrot, inputs.splice_rows,
                            backend=backend)
        if prefix_ids is not None:
            prefix_kv = self.prefix_states(prefix_ids)
        cache = None
        if prefix_kv is not None:
            cache = _stopping_cache()  # a DynamicCache; the last-layer tail can reuse it
            for layer, (k, v) in enumerate(prefix_kv):
                cache.update(k, v, layer)
        query_from = inputs.query_from
        if query_from > 0:
            tail = self._last_layer_tail(emb, position_ids, attention_mask, cache, query_from)
            if tail is not None:
                width = emb.shape[1]
                rows = (supervised_rows // width) * (width - query_from) \
                    + supervised_rows % width - query_from
                return tail.reshape(-1, tail.shape[-1]).index_select(0, rows)
        hidden = self.hidden_states(emb, position_ids=position_ids,
                                    attention_mask=attention_mask, past_key_values=cache)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, supervised_rows)

    def _last_layer_tail(self, emb: torch.Tensor, position_ids: torch.Tensor | None,
                         attention_mask: torch.Tensor | None, cache: Any,
                         c: int) -> torch.Tensor | None:
        """Final hidden states of columns ``c:`` only, with the last decoder layer run on those
        query rows alone (its attention output and MLP skipped for the first ``c`` columns).

        Pass 1 runs the model over every column and stops in the last layer right after it has
        stored its keys and values; a pre-hook keeps that layer's inputs. Pass 2 calls the last
        layer on rows ``c:`` with the same inputs cut to those query rows, attending to the
        stored keys and values (the cache replays them instead of appending), then the final
        norm. Returns None where this does not apply (not SDPA attention, an unknown layout,
        activation checkpointing, or a model that never stopped), and the caller runs one
        ordinary pass. ``cache`` is None or a :func:`_stopping_cache` holding the prefix.
        """
        base = self.base
        layers = getattr(base, "layers", None) or getattr(base, "h", None)
        norm = next((getattr(base, n) for n in ("norm", "ln_f", "final_layernorm")
                     if isinstance(getattr(base, n, None), nn.Module)), None)
        impl = getattr(self.model.config, "_attn_implementation", None)
        # Activation checkpointing would recompute the stopped pass in full during backward.
        if layers is None or norm is None or impl != "sdpa" or _checkpointing(self.model):
            return None
        last = len(layers) - 1
        if cache is None:
            cache = _stopping_cache()
        past = cache.get_seq_length() if cache_tensors(cache) else 0
        captured: dict[str, Any] = {}

        def keep_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["args"], captured["kwargs"] = args, kwargs

        hook = layers[last].register_forward_pre_hook(keep_inputs, with_kwargs=True)
        cache.stop_at = last
        try:
            self.base(inputs_embeds=emb, position_ids=position_ids, attention_mask=attention_mask,
                      use_cache=True, **{cache_argument(base): cache})
            return None  # the model never stored keys and values through the cache
        except _StopForward:
            pass
        finally:
            hook.remove()
            cache.stop_at = None
        rows, kv_len = emb.shape[1], past + emb.shape[1]

        def cut(x: Any) -> Any:
            if isinstance(x, tuple):
                return tuple(cut(t) for t in x)
            if not isinstance(x, torch.Tensor):
                return x
            if x.dim() == 4 and x.shape[-2] == rows and x.shape[-1] == kv_len:
                return x[..., c:, :]  # attention mask [B, 1, q, kv]
            if x.dim() == 3 and x.shape[-2] == rows:
                return x[:, c:]  # rotary cos / sin [B, q, d]
            if x.dim() == 2 and x.shape[-1] == rows:
                return x[..., c:]  # position ids
            if x.dim() == 1 and x.shape[0] == rows:
                return x[c:]  # cache positions
            return x

        args, kwargs = captured["args"], dict(captured["kwargs"])
        if args:
            hidden_in, rest = args[0], tuple(cut(a) for a in args[1:])
        else:
            hidden_in, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: cut(v) for k, v in kwargs.items()}
        masks = [x for x in rest + tuple(kwargs.values())
                 if isinstance(x, torch.Tensor) and x.dim() == 4]
        if not masks:
            # SDPA ran causal without a mask; a query block that is not the whole sequence
            # needs an explicit, bottom-right aligned one.
            q = torch.arange(c, rows, device=emb.device)[:, None] + past
            causal = torch.arange(kv_len, device=emb.device)[None, :] <= q
            mask = causal[None, None].expand(emb.shape[0], 1, -1, -1)
            if "attention_mask" in kwargs or len(rest) < 2:
                kwargs["attention_mask"] = mask
            else:  # positional, as GPT-2 passes it (after the cache)
                rest = rest[:1] + (mask,) + rest[2:]
        cache.replay = last
        try:
            out = layers[last](hidden_in[:, c:], *rest, **kwargs)
        finally:
            cache.replay = None
        out = out[0] if isinstance(out, tuple) else out
        return norm(out)

    @property
    def checkpointing(self) -> bool:
        """Whether the model recomputes activations in backward (activation checkpointing)."""
        return _checkpointing(self.model)

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model."""
        cfg = self.model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return int(cfg.num_hidden_layers)

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor, normalizer: float,
                  backend: str = "auto") -> torch.Tensor:
        """Summed cross-entropy of rows ``hidden`` ``[R, H]`` against ``labels`` ``[R]`` through
        the LM head (fused, no logits tensor), divided by ``normalizer``."""
        from .kernels import fused_linear_cross_entropy

        head = self.head
        return fused_linear_cross_entropy(hidden, head.weight, labels, head.bias,
                                          normalizer=normalizer, logit_scale=self.logit_scale,
                                          backend=backend)

    def head_unlikelihood(self, hidden: torch.Tensor, labels: torch.Tensor,
                          normalizer: float) -> torch.Tensor:
        """Summed unlikelihood ``-log(1 - p(label))`` of rows ``hidden`` ``[R, H]`` through the
        LM head, divided by ``normalizer``: the loss that makes a label unlikely.

        In fp32: ``-log1p(-p)`` where ``p`` is below one half (accurate for a small ``p``), else
        ``logsumexp(z) - logsumexp(z without the label)``, which stays finite where ``p`` rounds
        to 1. Its gradient is bounded (at most ``p`` per logit). The rows are few (a target's
        first tokens), so the logits are built in full.
        """
        head = self.head
        z = torch.nn.functional.linear(hidden, head.weight, head.bias).float() * self.logit_scale
        y = labels.long()[:, None]
        lse = torch.logsumexp(z, 1)
        p = (z.gather(1, y)[:, 0] - lse).exp()
        high = lse - torch.logsumexp(z.scatter(1, y, float("-inf")), 1)
        low = -torch.log1p(-p.clamp(max=0.5))  # the clamp keeps the unused branch finite
        return torch.where(p < 0.5, low, high).sum() / normalizer


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (transformers 5 renamed the gradient flag)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


class _StopForward(Exception):
    """Raised by a stopping cache once the layer it waits for has stored its keys and values."""


_STOPPING_CACHE: Any = None


def _stopping_cache() -> Any:
    """An empty Hugging Face ``DynamicCache`` whose ``update`` raises :class:`_StopForward`
    after storing the keys and values of layer ``stop_at`` (None: never). Every attention
    implementation calls ``update`` right after computing them, before attention itself, so
    this skips the rest of that layer (and the layers above) for inputs whose outputs are not
    needed."""
    global _STOPPING_CACHE
    if _STOPPING_CACHE is None:
        from transformers import DynamicCache

        class StoppingCache(DynamicCache):
            stop_at: int | None = None
            replay: int | None = None

            def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
                       layer_idx: int, *args: Any, **kwargs: Any) -> Any:
                if layer_idx == self.replay:  # already stored: return it, append nothing
                    layer = self.layers[layer_idx]
                    return layer.keys, layer.values
                out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
                if layer_idx == self.stop_at:
                    raise _StopForward
                return out

        _STOPPING_CACHE = StoppingCache
    return _STOPPING_CACHE()


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer ``(keys, values)`` of a Hugging Face dynamic cache (old and new layouts)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))


def accepts_argument(module: nn.Module, name: str) -> bool:
    """Whether ``module.forward`` takes a parameter called ``name``."""
    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def cache_argument(module: nn.Module) -> str:
    """The forward's KV-cache parameter: transformers 5 renamed ``past_key_values`` to ``cache``."""
    return "cache" if accepts_argument(module, "cache") else "past_key_values"


def context_length(model: Any) -> int | None:
    """The model's context window (positions), when its config states one."""
    cfg = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


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


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration, restoring the previous mode (dropout stays off in training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
