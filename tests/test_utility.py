"""Utility metrics against brute force: one unpadded full forward per row, full-vocabulary KL."""
from __future__ import annotations

import random

import pytest
import torch

from sande_fast.utility import CleanReference, agreement, coarse_kl, teacher_forced_logprobs
from tiny_models import ARCHS, tiny_model

VOCAB = 40


def _case(seed: int = 0, n: int = 7) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 9))] for _ in range(n)]
    answers = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    return prompts, answers


def _brute_logprobs(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> torch.Tensor:
    x = torch.tensor([prompt + answer[:-1]])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1:], dim=-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_teacher_forced_logprobs_match_one_row_at_a_time(arch: str) -> None:
    model = tiny_model(arch, VOCAB, seed=1)
    prompts, answers = _case()
    seen = set()
    for idx, logp in teacher_forced_logprobs(model, prompts, answers, pad_id=0, batch_size=3):
        at = 0
        for i in idx:
            n = len(answers[i])
            want = _brute_logprobs(model, prompts[i], answers[i])
            torch.testing.assert_close(logp[at:at + n], want, atol=2e-5, rtol=1e-4)
            at += n
            seen.add(i)
        assert at == logp.shape[0]
    assert seen == set(range(len(prompts)))


def test_coarse_kl_is_full_kl_with_every_token_and_a_lower_bound_with_fewer() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 30, generator=g) * 2, -1)
    q = torch.log_softmax(torch.randn(5, 30, generator=g) * 2, -1)
    full = (p.exp() * (p - q)).sum(-1)
    ids = p.topk(30, -1).indices
    torch.testing.assert_close(coarse_kl(p.gather(1, ids), q.gather(1, ids)), full,
                               atol=1e-5, rtol=1e-4)
    for k in (1, 4, 12):
        ids = p.topk(k, -1).indices
        part = coarse_kl(p.gather(1, ids), q.gather(1, ids))
        assert (part <= full + 1e-6).all()
        assert (part >= 0).all()
    assert coarse_kl(p.gather(1, ids), p.gather(1, ids)).abs().max() < 1e-6


def test_agreement_counts_prefix_and_whole_answers() -> None:
    ref = [[1, 2, 3], [4, 5], [6]]
    got = [[1, 2, 9], [4, 5], [7]]
    assert agreement(got, ref, 2) == pytest.approx(2 / 3)
    assert agreement(got, ref, None) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        agreement(got[:2], ref)


def test_reference_against_itself_and_a_changed_model() -> None:
    prompts, answers = _case(3)
    ref_model = tiny_model("llama", VOCAB, seed=1)
    ref = CleanReference.take(ref_model, prompts, answers, pad_id=0, batch_size=2, top_k=VOCAB)
    same = ref.compare(ref_model, answers)
    assert same["agreement"] == same["agreement_full"] == 1.0
    assert abs(same["answer_nll_delta"]) < 1e-5 and same["kl"] < 1e-6

    other = tiny_model("llama", VOCAB, seed=2)
    got = ref.compare(other, [a[:-1] + [0] for a in answers])
    nll_ref = nll_other = kl = 0.0
    count = 0
    for p, a in zip(prompts, answers):
        lp, lq = _brute_logprobs(ref_model, p, a), _brute_logprobs(other, p, a)
        labels = torch.tensor(a)[:, None]
        nll_ref += float(-lp.gather(1, labels).sum())
        nll_other += float(-lq.gather(1, labels).sum())
        kl += float((lp.exp() * (lp - lq)).sum())
        count += len(a)
    assert got["answer_nll_delta"] == pytest.approx((nll_other - nll_ref) / count, abs=1e-4)
    assert got["kl"] == pytest.approx(kl / count, rel=1e-3, abs=1e-5)  # top_k = vocab: exact
    assert got["agreement_full"] == 0.0


def _brute_greedy(model: torch.nn.Module, prompt: list[int], stops: set[int],
                  max_new_tokens: int) -> list[int]:
    """One row, no cache, no padding: the full sequence through the model at every step."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([prompt + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt in stops:
                break
    return out


def _nudged(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return other


@pytest.mark.parametrize("arch", ARCHS)
def test_compare_greedy_gives_plain_greedy_answers_without_decoding_matching_rows(
        arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    ev = importlib.import_module("sande_fast.evaluate")  # the package exports a function so named
    calls: list[int] = []
    plain = ev.greedy_generate

    def counted(model, prompts, **kw):  # type: ignore[no-untyped-def]
        calls.append(len(prompts))
        return plain(model, prompts, **kw)
    monkeypatch.setattr(ev, "greedy_generate", counted)

    stops, budget = {1, 2}, 7
    ref_model = tiny_model(arch, VOCAB, seed=1)
    prompts, _ = _case(3, n=12)
    ref_answers = [_brute_greedy(ref_model, p, stops, budget) for p in prompts]
    ref_answers[5] = []  # an empty answer is decoded whole
    ref = CleanReference.take(ref_model, prompts, ref_answers, pad_id=0, batch_size=3,
                              top_k=VOCAB)
    kw = dict(stop_ids=sorted(stops), max_new_tokens=budget, batch_size=4)

    metrics, answers = ref.compare_greedy(ref_model, **kw)
    want = [_brute_greedy(ref_model, p, stops, budget) for p in prompts]
    assert answers == want
    assert calls == [1]  # only the empty answer was decoded
    assert metrics == pytest.approx(ref.compare(ref_model, want))

    # Changed models: some rows follow the reference, the rest depart from it somewhere.
    for scale, seed in ((0.05, 3), (0.3, 4), (3.0, 5)):
        calls.clear()
        other = _nudged(ref_model, scale, seed)
        metrics, answers = ref.compare_greedy(other, **kw)
        want = [_brute_greedy(other, p, stops, budget) for p in prompts]
        assert answers == want, (scale, seed)
        assert metrics == pytest.approx(ref.compare(other, want))
        assert sum(calls) <= len(prompts) - sum(a == r for a, r in zip(want, ref_answers)
                                                 if r)
