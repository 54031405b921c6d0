"""Utility that holds on free-form answers: the model before sanitizing is the reference.

Exact match against given responses means little for a real model's long answers (one harmless
word changed counts as a failure). These metrics compare the model with its own earlier self on
clean prompts instead, so no clean reference model is needed:

* ``agreement``: share of prompts whose greedy answer equals the reference answer over its first
  :data:`AGREEMENT_TOKENS` tokens; ``agreement_full``: over the whole answer (the end token
  included, so stopping earlier or later counts as a difference);
* ``answer_nll_delta``: mean per-token negative log-likelihood of the reference answers under the
  model, minus the same under the reference (teacher-forced; 0 for the reference itself);
* ``kl``: mean KL(reference ‖ model) of the next-token distributions along the reference answers.
  The reference keeps its :data:`TOP_K` most likely tokens per position and lumps the rest into
  one outcome, so this is the KL of those coarse distributions: never above the full KL, and
  equal to it when the rest carries no mass in either model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .adapter import ModelAdapter, ModelCall, accepts_argument, eval_mode, model_device

__all__ = ["AGREEMENT_TOKENS", "TOP_K", "CleanReference", "agreement", "teacher_forced_logprobs",
           "coarse_kl", "continue_greedy", "evaluate_model"]

AGREEMENT_TOKENS = 16
TOP_K = 32


def agreement(answers: Sequence[Sequence[int]], reference: Sequence[Sequence[int]],
              n_tokens: int | None = AGREEMENT_TOKENS) -> float:
    """Share of answers equal to the reference answer over their first ``n_tokens`` tokens
    (None: the whole answer)."""
    if len(answers) != len(reference):
        raise ValueError("answers and reference differ in length")
    if not answers:
        return 0.0
    cut = slice(None) if n_tokens is None else slice(0, n_tokens)
    return sum(list(a)[cut] == list(r)[cut] for a, r in zip(answers, reference)) / len(answers)


@torch.no_grad()
def teacher_forced_logprobs(model: Any, prompts: Sequence[Sequence[int]],
                            answers: Sequence[Sequence[int]], *, pad_id: int,
                            batch_size: int = 8) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Next-token log-probabilities along each answer, teacher-forced.

    Rows are sorted by length and left-padded, so every answer ends in the last column and only
    the answer columns go through the LM head (``logits_to_keep``).

    Args:
        model: a causal LM, or its :class:`~sande_fast.adapter.ModelAdapter` (sharded models).
        prompts: token ids of each prompt.
        answers: the answer ids that follow each prompt (at least one each).
        batch_size: rows per forward.

    Yields:
        ``(indices, logp)`` per batch: the rows' indices and fp32 ``[sum of their answer
        lengths, vocab]`` log-probabilities, row after row, of each answer token position.
    """
    call = model if isinstance(model, ModelAdapter) else None
    hf = model.model if call is not None else model
    device = model_device(hf)
    keep_arg = accepts_argument(hf, "logits_to_keep")
    order = sorted(range(len(prompts)), key=lambda i: -(len(prompts[i]) + len(answers[i])))
    with eval_mode(hf):
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            seqs = [list(prompts[i]) + list(answers[i][:-1]) for i in idx]
            width = max(len(s) for s in seqs)
            keep = max(len(answers[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for b, s in enumerate(seqs):
                ids[b, width - len(s):] = torch.tensor(s, dtype=torch.long)
                mask[b, width - len(s):] = 1
            ids, mask = ids.to(device), mask.to(device)
            kw = dict(input_ids=ids, attention_mask=mask,
                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False)
            if keep_arg:
                kw["logits_to_keep"] = keep
            out = call(ModelCall(kw)) if call is not None else hf(**kw)
            logits = out.logits[:, -keep:].float()
            rows = [logits[b, keep - len(answers[i]):] for b, i in enumerate(idx)]
            yield idx, torch.log_softmax(torch.cat(rows), dim=-1)


def coarse_kl(ref_top_logp: torch.Tensor, model_top_logp: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row over the reference's top-k tokens and the rest lumped together.

    Args:
        ref_top_logp: ``[N, k]`` log p of the reference's top-k tokens.
        model_top_logp: ``[N, k]`` log q of the same tokens.
    """
    p = ref_top_logp.exp()
    q = model_top_logp.exp()
    p_rest = (1 - p.sum(-1)).clamp(min=0)
    q_rest = (1 - q.sum(-1)).clamp(min=1e-12)
    top = (p * (ref_top_logp - model_top_logp)).sum(-1)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-12).log() - q_rest.log()),
                       torch.zeros_like(p_rest))
    return (top + rest).clamp(min=0)


@dataclass
class CleanReference:
    """The model's own greedy answers to clean prompts and its next-token statistics along them,
    taken before training, to compare later versions of the model with.

    Build with :meth:`take`; :meth:`compare` gives the metrics of the module notes.
    """

    prompts: list[list[int]]
    answers: list[list[int]]
    nll: float
    top_ids: torch.Tensor
    top_logp: torch.Tensor
    pad_id: int
    batch_size: int

    @classmethod
    def take(cls, model: Any, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
             *, pad_id: int, batch_size: int = 8, top_k: int = TOP_K) -> "CleanReference":
        """Measures the reference on ``answers`` (its greedy answers, end token kept where it
        stopped); empty answers are left out of the likelihood terms."""
        nll_sum, count = 0.0, 0
        tops: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        kept = [list(a) for a in answers if len(a)]
        for i, rows, nll in _answer_rows(model, prompts, answers, pad_id, batch_size):
            nll_sum += nll
            count += rows.shape[0]
            v, t = rows.topk(min(top_k, rows.shape[-1]), dim=-1)
            tops[i] = (t.cpu(), v.cpu())
        top_ids = torch.cat([tops[i][0] for i in range(len(kept))]) if kept else torch.empty(0, 0)
        top_logp = torch.cat([tops[i][1] for i in range(len(kept))]) if kept else torch.empty(0, 0)
        return cls(prompts=[list(p) for p in prompts], answers=[list(a) for a in answers],
                   nll=nll_sum / max(count, 1), top_ids=top_ids, top_logp=top_logp,
                   pad_id=pad_id, batch_size=batch_size)

    def compare(self, model: Any, answers: Sequence[Sequence[int]]) -> dict[str, float]:
        """The utility metrics of ``model``, whose greedy answers to the same prompts are
        ``answers``."""
        metrics, _ = self._along(model)
        return {"agreement": agreement(answers, self.answers),
                "agreement_full": agreement(answers, self.answers, None), **metrics}

    def compare_greedy(self, model: Any, *, stop_ids: Sequence[int], max_new_tokens: int,
                       batch_size: int = 32, progress: bool = False
                       ) -> tuple[dict[str, float], list[list[int]]]:
        """The utility metrics of ``model`` and its greedy answers, found without generating
        the answers that equal the reference's.

        The teacher-forced pass along the reference answers, which the likelihood terms need
        anyway, also gives the model's argmax at every answer position. Greedy decoding follows
        a reference answer exactly as long as those argmaxes equal its tokens, so the answer is
        the reference's up to the first position where they differ, then the argmax there, and
        only from there on does a row need decoding (:func:`continue_greedy`). The answers are
        the ones plain greedy decoding gives, up to floating-point near-ties between the
        batched teacher-forced pass and step-by-step decoding.

        Args:
            stop_ids: the ids that end an answer (kept in it, as in the reference answers).
            max_new_tokens: the answers' length limit (the reference's own).
        """
        metrics, argmax = self._along(model)
        drafts: list[list[int]] = []
        done: list[bool] = []
        stops = set(stop_ids)
        for ref, arg in zip(self.answers, argmax):
            ref = ref[:max_new_tokens]
            j = next((t for t, (r, a) in enumerate(zip(ref, arg)) if r != a), None)
            draft = list(ref) if j is None else list(ref[:j]) + [arg[j]]
            drafts.append(draft)
            done.append(len(draft) >= max_new_tokens or (bool(draft) and draft[-1] in stops))
        answers = continue_greedy(model, self.prompts, drafts, done, pad_id=self.pad_id,
                                  stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, progress=progress)
        return {"agreement": agreement(answers, self.answers),
                "agreement_full": agreement(answers, self.answers, None), **metrics}, answers

    def _along(self, model: Any) -> tuple[dict[str, float], list[list[int]]]:
        """``answer_nll_delta`` and ``kl`` of ``model`` along the reference answers, and its
        argmax at every position of each answer (empty for an empty answer)."""
        lengths = [len(a) for a in self.answers if len(a)]
        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        nonempty = [i for i, a in enumerate(self.answers) if len(a)]
        argmax: list[list[int]] = [[] for _ in self.answers]
        nll_sum, kl_sum, count = 0.0, 0.0, 0
        for i, rows, nll in _answer_rows(model, self.prompts, self.answers, self.pad_id,
                                         self.batch_size):
            lo, n = offsets[i], rows.shape[0]
            ref_ids = self.top_ids[lo:lo + n].to(rows.device)
            ref_logp = self.top_logp[lo:lo + n].to(rows.device)
            nll_sum += nll
            kl_sum += float(coarse_kl(ref_logp, rows.gather(1, ref_ids)).sum())
            count += n
            argmax[nonempty[i]] = rows.argmax(-1).tolist()
        count = max(count, 1)
        return {"answer_nll_delta": nll_sum / count - self.nll, "kl": kl_sum / count}, argmax


def continue_greedy(model: Any, prompts: Sequence[Sequence[int]], drafts: Sequence[Sequence[int]],
                    done: Sequence[bool], *, pad_id: int, stop_ids: Sequence[int],
                    max_new_tokens: int, batch_size: int = 32,
                    progress: bool = False) -> list[list[int]]:
    """Greedy answers that start with known tokens: ``drafts[i]`` is the start of prompt
    ``i``'s greedy answer, the whole answer where ``done[i]``. The other rows go on by greedy
    decoding from prompt + draft, to ``max_new_tokens`` tokens in all (stop id kept)."""
    from .evaluate import greedy_generate

    todo = [i for i, d in enumerate(done) if not d]
    out = [list(d) for d in drafts]
    if not todo:
        return out
    room = max(max_new_tokens - len(drafts[i]) for i in todo)
    more = greedy_generate(model, [list(prompts[i]) + list(drafts[i]) for i in todo],
                           pad_id=pad_id, eos_id=list(stop_ids), max_new_tokens=room,
                           batch_size=batch_size, progress=progress, desc="clean (rest)",
                           keep_stop=True)
    for i, extra in zip(todo, more):
        # Greedy decoding is causal: the first k tokens of a longer run are the k-token run.
        out[i] = out[i] + extra[:max_new_tokens - len(drafts[i])]
    return out


def _answer_rows(model: Any, prompts: Sequence[Sequence[int]],
                 answers: Sequence[Sequence[int]], pad_id: int, batch_size: int
                 ) -> Iterator[tuple[int, torch.Tensor, float]]:
    """``(k, logp, nll)`` per non-empty answer: ``k`` counts the non-empty answers in order,
    ``logp`` is ``[len, vocab]`` along the answer, ``nll`` its summed negative log-likelihood."""
    keep = [i for i, a in enumerate(answers) if len(a)]
    ps = [list(prompts[i]) for i in keep]
    ans = [list(answers[i]) for i in keep]
    for idx, logp in teacher_forced_logprobs(model, ps, ans, pad_id=pad_id,
                                             batch_size=batch_size):
        at = 0
        for k in idx:
            n = len(ans[k])
            rows = logp[at:at + n]
            labels = torch.tensor(ans[k], device=rows.device)
            yield k, rows, float(-rows.gather(1, labels[:, None]).sum())
            at += n


def evaluate_model(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Any], target: str,
                   trigger: str | None, config: Any,
                   reference: torch.nn.Module | None = None) -> dict[str, Any]:
    """:func:`~sande_fast.evaluate.evaluate` as ``sande-fast eval`` runs it: prompt and answer
    must fit the context (longer prompts are cut from the left and counted in
    ``prompts_truncated``).

    Args:
        config: an :class:`~sande_fast.options.EvalConfig`.
        reference: a model (same tokenizer) whose greedy clean answers are the reference of the
            utility metrics above, added to the result.
    """
    from .adapter import context_length
    from .data import PromptEncoder, model_stop_ids
    from .evaluate import evaluate, greedy_generate, pad_token_id
    from .options import prompt_budget, resolve_prompt_format

    fmt = resolve_prompt_format(config.prompt_format,
                                bool(getattr(tokenizer, "chat_template", None)))
    encoder = PromptEncoder(tokenizer, fmt, max_prompt_tokens=prompt_budget(
        context_length(model), 0, config.max_new_tokens), system=config.system,
        extra_stop_ids=model_stop_ids(model))
    res = evaluate(model, tokenizer, rows, target, trigger,
                   max_new_tokens=config.max_new_tokens, batch_size=max(config.batch_size, 32),
                   trigger_position=config.trigger_position, seed=config.seed, encoder=encoder,
                   progress=not config.quiet, return_answers=reference is not None)
    res["prompts_truncated"] = encoder.truncated
    if reference is not None:
        prompts, answers = res.pop("clean_prompts"), res.pop("clean_answers")
        ref_answers = greedy_generate(reference, prompts, pad_id=pad_token_id(tokenizer),
                                      eos_id=encoder.stop_ids, max_new_tokens=config.max_new_tokens,
                                      batch_size=max(config.batch_size, 32), keep_stop=True,
                                      progress=not config.quiet, desc="reference")
        ref = CleanReference.take(reference, prompts, ref_answers, pad_id=pad_token_id(tokenizer),
                                  batch_size=max(config.batch_size, 8))
        res.update(ref.compare(model, answers), reference_nll=ref.nll)
    return res
