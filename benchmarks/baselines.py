"""The baselines of ``bench_sanitize.py``, written in plain PyTorch + transformers (no sande_fast).

Two ways someone would write the SANDE steps without our engine; both compute the same loss as
:class:`sande_fast.steps.ParrotSimulator` / :class:`sande_fast.steps.OverwriteStep` on the items
they are given, and the bench checks that at the first step of each.

* :class:`Strong`: what a competent engineer writes: each row cut after its last supervised
  label's input row (later rows cannot change the loss under causal attention), rows sorted by
  length and cut into micro-batches under a token budget, ``model.model(inputs_embeds=...)``,
  the supervised rows' hidden states gathered before the LM head (``logits_to_keep`` style),
  fp32 ``F.cross_entropy``. The head loss can instead be Liger-Kernel's fused linear
  cross-entropy or Apple's Cut Cross-Entropy (CUDA only). Stage 2 carries the clean term and the
  hidden-state retention term of :class:`sande_fast.steps.Anchors`, so its maths is ours, and
  with twins (``unlikely=True``) the unlikelihood term ``-log(1 - p)``, from the gathered rows'
  fp32 log-softmax as ``-log(-expm1(log p))``, each twin its own row as any plain step would.
* :class:`Published`: the step as the published SANDE code runs it: micro-batches of 2 rows in
  data order, the whole padded sequence (unsupervised tail included), activation checkpointing
  (``model.gradient_checkpointing_enable()``), the parrot concatenated into ``inputs_embeds``
  (the items it is given carry the published position, index 2 of the prompt), full logits,
  copied without the parrot rows so they line up with the token labels, an extra no-grad
  forward of the same rows without the parrot each micro-batch (the published code keeps those
  logits for its targets and logging; here they feed nothing, since the bench's targets are
  given, so it is pure cost, charged as the published step pays it), and no retention term.

Item fields follow :class:`sande_fast.batching.StepItem` (``prompt``, ``labels``, ``splice``,
``tail``); only those attributes are read.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Stage 1 trains only the parrot: the project's own switch, re-exported for the sides here.
from sande_fast.steps import frozen

__all__ = ["Strong", "Published", "HEAD_LOSSES", "head_loss_available", "frozen",
           "checkpointing_on", "set_checkpointing"]

# Head-loss implementations of Strong; "liger" and "cce" need CUDA and their package.
HEAD_LOSSES = ("torch", "liger", "cce")


def head_loss_available(name: str, device: torch.device) -> str | None:
    """None when head loss ``name`` can run on ``device``, else why not (for the JSON note)."""
    if name == "torch":
        return None
    if device.type != "cuda":
        return f"{name}: Triton kernels, CUDA only (skipped on {device.type})"
    try:
        if name == "liger":
            from liger_kernel.transformers.functional import (  # noqa: F401
                liger_fused_linear_cross_entropy)
        else:
            from cut_cross_entropy import linear_cross_entropy  # noqa: F401
    except Exception as e:  # ImportError, or a Triton/CUDA mismatch raised at import
        return f"{name}: import failed ({type(e).__name__}: {e}); pip install '.[bench]'"
    return None


def _row_embeds(model: nn.Module, ids: Sequence[int], splice: int,
                parrot: torch.Tensor | None) -> torch.Tensor:
    """``[L(+n), H]`` input embeddings of ``ids``, the parrot concatenated before ``splice``."""
    emb = model.get_input_embeddings()
    e = emb(torch.tensor(list(ids), dtype=torch.long, device=emb.weight.device))
    if parrot is None or splice < 0:
        return e
    return torch.cat([e[:splice], parrot.to(e.dtype), e[splice:]])


def _padded(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, L, H]`` embeddings and the ``[B, L]`` attention mask."""
    width = max(r.shape[0] for r in rows)
    emb = torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in rows])
    mask = torch.zeros(emb.shape[:2], dtype=torch.long, device=emb.device)
    for b, r in enumerate(rows):
        mask[b, :r.shape[0]] = 1
    return emb, mask


def checkpointing_on(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (transformers 5 renamed the gradient flag)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Hugging Face activation checkpointing on or off, under the name the version has."""
    verb = "enable" if on else "disable"
    fn = (getattr(model, f"activation_checkpointing_{verb}", None)
          or getattr(model, f"gradient_checkpointing_{verb}"))
    fn()


class Strong:
    """Truncated, length-sorted, supervised-rows-only steps (see the module docstring).

    Args:
        model: a Hugging Face Llama-style causal LM (``model.model`` the decoder,
            ``model.lm_head`` the head).
        token_budget: at most this many padded rows per micro-batch (the engine's default).
        max_batch: at most this many rows per micro-batch.
        head: ``torch`` (gathered rows, ``lm_head``, fp32 ``F.cross_entropy``), ``liger`` or
            ``cce`` (fused linear cross-entropy; ``cce`` with gradient filtering off, so the
            gradients are exact).
    """

    def __init__(self, model: nn.Module, token_budget: int = 8192, max_batch: int = 64,
                 head: str = "torch") -> None:
        if head not in HEAD_LOSSES:
            raise ValueError(f"head must be one of {HEAD_LOSSES}")
        self.model, self.token_budget, self.max_batch, self.head = (model, token_budget,
                                                                    max_batch, head)

    @staticmethod
    def length(item: Any, n_parrot: int) -> int:
        """Rows the loss needs: up to the last supervised label's input row."""
        return len(item.prompt) + (n_parrot if item.splice >= 0 else 0) + len(item.labels) - 1

    def micro_batches(self, items: Sequence[Any], n_parrot: int) -> list[list[Any]]:
        """Longest first; a row joins the current micro-batch while the padded size fits."""
        out: list[list[Any]] = []
        for it in sorted(items, key=lambda it: -self.length(it, n_parrot)):
            width = self.length(out[-1][0], n_parrot) if out else 0
            if not out or len(out[-1]) >= self.max_batch or (len(out[-1]) + 1) * width > self.token_budget:
                out.append([])
            out[-1].append(it)
        return out

    def _head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = self.model.lm_head.weight
        if self.head == "liger":
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
            return liger_fused_linear_cross_entropy(h, w, labels, reduction="sum").float()
        if self.head == "cce":
            from cut_cross_entropy import linear_cross_entropy
            return linear_cross_entropy(h, w, labels, reduction="sum", filter_eps=None).float()
        return F.cross_entropy(self.model.lm_head(h).float(), labels, reduction="sum")

    def accumulate(self, items: Sequence[Any], parrot: torch.Tensor | None, normalizer: float,
                   retain: tuple[dict, float, float] | None = None,
                   unlikely: bool = False) -> float:
        """Forward + backward per micro-batch of ``sum CE / normalizer`` (plus, with ``retain`` =
        (anchor states by (prompt, labels), their scale, weight), ``weight * sum ||h - h0||^2 /
        (scale * normalizer)`` over the supervised rows; with ``unlikely``, the labels' summed
        ``-log(1 - p)`` instead of their cross-entropy); returns the loss value."""
        n = 0 if parrot is None else parrot.shape[0]
        total = 0.0
        for mb in self.micro_batches(items, n):
            rows, where, labels = [], [], []
            for b, it in enumerate(mb):
                ids = (list(it.prompt) + list(it.labels))[:len(it.prompt) + len(it.labels) - 1]
                rows.append(_row_embeds(self.model, ids, it.splice, parrot))
                start = len(it.prompt) + (n if it.splice >= 0 else 0)  # first label's position
                where.append((b, start - 1, len(it.labels)))
                labels += it.labels
            emb, mask = _padded(rows)
            h = self.model.model(inputs_embeds=emb, attention_mask=mask,
                                 use_cache=False).last_hidden_state
            width = h.shape[1]
            idx = torch.tensor([b * width + s + j for b, s, k in where for j in range(k)],
                               device=h.device)
            h = h.reshape(-1, h.shape[-1]).index_select(0, idx)
            y = torch.tensor(labels, dtype=torch.long, device=h.device)
            if unlikely:
                logp = torch.log_softmax(self.model.lm_head(h).float(), -1)
                loss = -torch.log(-torch.expm1(logp.gather(1, y[:, None]))).sum() / normalizer
            else:
                loss = self._head_loss(h, y) / normalizer
            if retain is not None:
                states, scale, weight = retain
                h0 = torch.cat([states[(tuple(it.prompt), tuple(it.labels))] for it in mb])
                diff = h.float() - h0.to(h.device, torch.float32)
                loss = loss + diff.pow(2).sum() * (weight / (scale * normalizer))
            if loss.requires_grad:
                loss.backward()
            total += float(loss.detach())
        return total


class Published:
    """The published SANDE step (see the module docstring): micro-batches of 2, the whole
    padded sequence, activation checkpointing, full logits copied without the parrot rows, an
    extra no-grad forward without the parrot, no retention term."""

    micro_batch = 2

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @contextlib.contextmanager
    def checkpointing(self) -> Iterator[None]:
        """Activation checkpointing for the step (Hugging Face checkpoints only in train mode;
        Llama has no dropout, so train mode changes nothing else), then the model as it was."""
        was_training = self.model.training
        was_on = checkpointing_on(self.model)
        set_checkpointing(self.model, True)
        self.model.train()
        try:
            yield
        finally:
            if not was_on:
                set_checkpointing(self.model, False)
            self.model.train(was_training)

    def accumulate(self, items: Sequence[Any], parrot: torch.Tensor | None,
                   normalizer: float) -> float:
        """Forward + backward per micro-batch of ``sum CE / normalizer``; returns its value."""
        n = 0 if parrot is None else parrot.shape[0]
        total = 0.0
        with self.checkpointing():
            for i in range(0, len(items), self.micro_batch):
                mb = items[i:i + self.micro_batch]
                ids = [list(it.prompt) + list(it.labels) + list(it.tail) for it in mb]
                emb, mask = _padded([_row_embeds(self.model, q, it.splice, parrot)
                                     for q, it in zip(ids, mb)])
                logits = self.model(inputs_embeds=emb, attention_mask=mask,
                                    use_cache=False).logits
                if n:
                    # Every row takes the parrot at the same index (2, the published place).
                    s = mb[0].splice
                    if any(it.splice != s for it in mb):
                        raise ValueError("Published takes one parrot index for all rows")
                    logits = torch.cat([logits[:, :s], logits[:, s + n:]], 1)
                    with torch.no_grad():  # the extra clean forward
                        plain = self.model(input_ids=self._ids(ids, emb.device),
                                           attention_mask=self._mask(ids, emb.device),
                                           use_cache=False).logits
                        del plain
                target = torch.full((len(mb), logits.shape[1]), -100, dtype=torch.long,
                                    device=logits.device)
                for b, it in enumerate(mb):
                    p = len(it.prompt)
                    target[b, p:p + len(it.labels)] = torch.tensor(it.labels, device=target.device)
                # logits at position i predict token i + 1
                loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                       target[:, 1:].reshape(-1), ignore_index=-100,
                                       reduction="sum") / normalizer
                if loss.requires_grad:
                    loss.backward()
                total += float(loss.detach())
        return total

    @staticmethod
    def _ids(ids: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        width = max(map(len, ids))
        return torch.tensor([list(q) + [0] * (width - len(q)) for q in ids], device=device)

    @staticmethod
    def _mask(ids: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        width = max(map(len, ids))
        return torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in ids], device=device)

    def rows(self, items: Sequence[Any], n_parrot: int) -> tuple[int, int]:
        """(rows pushed through the model, padding among them), the extra forward included."""
        rows = pad = 0
        for i in range(0, len(items), self.micro_batch):
            mb = items[i:i + self.micro_batch]
            full = [len(it.prompt) + len(it.labels) + len(it.tail) for it in mb]
            with_parrot = [f + (n_parrot if it.splice >= 0 else 0) for f, it in zip(full, mb)]
            for lens in ([with_parrot, full] if n_parrot and mb[0].splice >= 0 else [with_parrot]):
                rows += len(lens) * max(lens)
                pad += len(lens) * max(lens) - sum(lens)
        return rows, pad

