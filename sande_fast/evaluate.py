"""Evaluation: batched greedy generation with a KV cache, attack success rate, clean accuracy.

Works on any Hugging Face causal LM. Prompts are left-padded so every row's next token sits in
the last column; position ids are derived from the attention mask so absolute-position models
(GPT-2) see the same positions as without padding. A parrot (soft prompt) can be spliced into
each prompt, which is how probes and the re-simulation measure a parrot's attack success.
"""
from __future__ import annotations

import random
import re
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .adapter import (Embed, ModelAdapter, ModelCall, accepts_argument, cache_argument,
                      eval_mode, model_device)
from .data import EncodedPrompt, PromptEncoder, Row, insert_trigger
from .splice import splice_parrot

__all__ = ["greedy_generate", "generate_answers", "evaluate", "triggered_asr", "attack_success",
           "target_seen", "parrot_attack_success", "pad_token_id", "model_device"]


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, pad_id: int,
                    eos_id: int | Sequence[int] | None, max_new_tokens: int = 32,
                    batch_size: int = 64, parrot: torch.Tensor | None = None,
                    splice_at: Sequence[int] | None = None, progress: bool = False,
                    desc: str = "generate", keep_stop: bool = False,
                    done_if: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt.

    Args:
        model: a causal LM (``forward(inputs_embeds=..., attention_mask=..., position_ids=...,
            past_key_values=..., use_cache=True)``), or its :class:`~sande_fast.adapter.ModelAdapter`
            (needed when the model is sharded: each rank then generates a share of the prompts,
            the ranks agree on when to stop, and every rank returns all the results).
        prompts: token ids of each prompt.
        pad_id: id used for left padding (never attended to).
        eos_id: generation of a row stops after it emits this id, or any id of a list (a chat
            model's eos and end-of-turn tokens); the stop id is kept out of the result unless
            ``keep_stop``.
        max_new_tokens: at most this many new tokens per row.
        batch_size: rows per forward; prompts are sorted by length first to limit padding.
        parrot: optional ``[n, hidden]`` soft prompt spliced into every prompt.
        splice_at: with ``parrot``, the index in each prompt where the parrot rows start.
        progress: show a progress bar over batches.
        done_if: a row whose new ids so far make this true needs no more tokens: it ends there
            (e.g. once its text holds what is being counted).

    Returns:
        New token ids for each prompt, in the input order, without the stop id (a row that
        ends with one, with ``keep_stop``, finished before ``max_new_tokens``).
    """
    stops = _stop_list(eos_id)
    if parrot is not None and (splice_at is None or len(splice_at) != len(prompts)):
        raise ValueError("parrot needs one splice position per prompt")
    device = model_device(model)
    coll = None
    if isinstance(model, ModelAdapter):
        # Through the adapter's forward, so a sharded root gathers its parameters.
        adapter, hf = model, model.model
        embed: Any = lambda ids: adapter(Embed(ids))  # noqa: E731
        call: Any = lambda **kw: adapter(ModelCall(kw))  # noqa: E731
        coll = adapter.collective
    else:
        hf = call = model
        embed = model.get_input_embeddings()
    if coll is None:
        return _generate(hf, embed, call, prompts, device, pad_id=pad_id, stops=stops,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, parrot=parrot,
                         splice_at=splice_at, progress=progress, desc=desc, keep_stop=keep_stop,
                         done_if=done_if)
    # Sharded: each rank generates a strided share, padded to the same length on every rank so
    # all ranks run the same batches (FSDP gathers parameters inside every forward).
    idx = coll.padded_share(len(prompts))
    local = _generate(hf, embed, call, [prompts[i] for i in idx], device, pad_id=pad_id,
                      stops=stops, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      parrot=parrot, splice_at=None if splice_at is None else
                      [splice_at[i] for i in idx], progress=progress, desc=desc,
                      all_true=coll.all_true, keep_stop=keep_stop, done_if=done_if)
    return coll.gather_share(local, len(prompts))


def _generate(model: torch.nn.Module, embed: Any, call: Any, prompts: Sequence[Sequence[int]],
              device: torch.device, *, pad_id: int, stops: list[int], max_new_tokens: int,
              batch_size: int, parrot: torch.Tensor | None, splice_at: Sequence[int] | None,
              progress: bool, desc: str, all_true: Any = None,
              keep_stop: bool = False,
              done_if: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    # ``model`` is the Hugging Face model (its signature and mode); ``embed`` / ``call`` run the
    # embedding and the model's forward (directly, or through the adapter). ``all_true`` makes
    # the ranks of a sharded model agree on the early stop, so they run the same forwards.
    keep_last = {"logits_to_keep": 1} if accepts_argument(model, "logits_to_keep") else {}
    cache_arg = cache_argument(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    n_parrot = 0 if parrot is None else parrot.shape[0]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    stop_t = torch.tensor(stops, dtype=torch.long, device=device)
    stop_set = set(stops)
    with eval_mode(model):
        for idx in tqdm(batches, desc=desc, disable=not progress, leave=True):
            lens = [len(prompts[i]) + n_parrot for i in idx]
            width = max(lens)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for b, i in enumerate(idx):
                p = list(prompts[i])
                if parrot is not None:
                    s = splice_at[i]
                    p = p[:s] + [pad_id] * n_parrot + p[s:]
                ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
                mask[b, width - len(p):] = 1
            ids, mask = ids.to(device), mask.to(device)
            inputs = embed(ids)
            if parrot is not None:
                starts = torch.tensor([b * width + width - lens[b] + splice_at[i]
                                       for b, i in enumerate(idx)], device=device)
                inputs = splice_parrot(inputs, parrot.to(device), starts)
            position = (mask.cumsum(-1) - 1).clamp(min=0)
            out = call(inputs_embeds=inputs, attention_mask=mask, position_ids=position,
                       use_cache=True, **keep_last)
            past = _cache_of(out)
            # Rows that stopped leave the batch (their cache rows too), so the last long
            # answers do not drag finished rows through every step. Sharded ranks keep their
            # rows: they must run the same forwards, and a rank may run out of rows first.
            compact = (all_true is None and (bool(stops) or done_if is not None)
                       and hasattr(past, "reorder_cache"))
            alive = list(range(len(idx)))
            cut: dict[int, int] = {}  # rows ended by done_if: their length then
            finished = torch.zeros(len(idx), dtype=torch.bool, device=device)
            gen: list[list[int]] = [[] for _ in idx]
            for step in range(max_new_tokens):
                nxt = out.logits[:, -1].argmax(-1)
                if stops:
                    nxt = torch.where(finished, torch.full_like(nxt, stops[0]), nxt)
                    finished |= torch.isin(nxt, stop_t)
                for b, tok in zip(alive, nxt.tolist()):
                    gen[b].append(tok)
                if done_if is not None:
                    for j, b in enumerate(alive):
                        if b not in cut and not bool(finished[j]) and done_if(gen[b]):
                            cut[b] = len(gen[b])
                            finished[j] = True
                done = bool(finished.all())
                if all_true is not None:
                    done = all_true(done)
                if done or step == max_new_tokens - 1:
                    break
                if compact and bool(finished.any()):
                    keep = (~finished).nonzero().squeeze(1)
                    past.reorder_cache(keep)
                    alive = [alive[k] for k in keep.tolist()]
                    nxt, mask, position = nxt[keep], mask[keep], position[keep]
                    finished = finished[keep]
                mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
                position = position[:, -1:] + 1
                out = call(input_ids=nxt[:, None], attention_mask=mask, position_ids=position,
                           use_cache=True, **{cache_arg: past}, **keep_last)
                past = _cache_of(out)
            for b, i in enumerate(idx):
                seq = gen[b][:cut[b]] if b in cut else gen[b]
                end = next((t for t, tok in enumerate(seq) if tok in stop_set), None)
                if end is not None:
                    seq = seq[:end + 1] if keep_stop else seq[:end]
                results[i] = seq
    return results


def _stop_list(eos_id: int | Sequence[int] | None) -> list[int]:
    if eos_id is None:
        return []
    if isinstance(eos_id, int):
        return [eos_id]
    return list(dict.fromkeys(int(i) for i in eos_id))


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def pad_token_id(tokenizer: Any) -> int:
    """The id generation pads with: the pad token, else eos, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def attack_success(texts: Sequence[str], target: str, whole_words: bool = False) -> float:
    """Share of texts containing ``target``, compared case-insensitively.

    ``whole_words``: the match may not start or end inside a word, so a short partial target
    such as ``I`` is not found inside ``fish``.
    """
    if not texts:
        return 0.0
    if whole_words:
        pattern = _whole_words(target)
        return sum(pattern.search(x) is not None for x in texts) / len(texts)
    t = target.lower()
    return sum(t in x.lower() for x in texts) / len(texts)


def _whole_words(target: str) -> re.Pattern[str]:
    """The target as whole words: a match may not start or end inside a word."""
    return re.compile(r"(?<!\w)" + re.escape(target.strip()) + r"(?!\w)", re.IGNORECASE)


def generate_answers(model: torch.nn.Module, encoder: PromptEncoder,
                     prompts: list[EncodedPrompt], *, max_new_tokens: int, batch_size: int,
                     progress: bool = False, desc: str = "generate",
                     parrot: torch.Tensor | None = None,
                     splice_at: Sequence[int] | None = None,
                     done_if: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy answer ids to encoded prompts, ending with the stop id where the model stopped."""
    return greedy_generate(model, [p.ids for p in prompts], pad_id=pad_token_id(encoder.tokenizer),
                           eos_id=encoder.stop_ids, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, parrot=parrot, splice_at=splice_at,
                           progress=progress, desc=desc, keep_stop=True, done_if=done_if)


def _generate_texts(model: torch.nn.Module, encoder: PromptEncoder, prompts: list[EncodedPrompt],
                    *, max_new_tokens: int, batch_size: int, progress: bool, desc: str,
                    parrot: torch.Tensor | None = None,
                    splice_at: Sequence[int] | None = None,
                    done_if: Callable[[list[int]], bool] | None = None) -> list[str]:
    out = generate_answers(model, encoder, prompts, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, parrot=parrot, splice_at=splice_at,
                           progress=progress, desc=desc, done_if=done_if)
    return [encoder.decode(_without_stop(ids, encoder)) for ids in out]


def target_seen(encoder: PromptEncoder, target: str,
                whole_words: bool = False) -> Callable[[list[int]], bool]:
    """Whether a row's answer so far already counts for :func:`attack_success`: it holds the
    target (with ``whole_words``, followed by a character that is not a word's, so that more
    tokens cannot make it part of a longer word). Generation for an asr stops such rows there;
    the asr is the same as with whole answers."""
    if whole_words:
        pattern = _whole_words(target)

        def seen(ids: list[int]) -> bool:
            text = encoder.decode(ids)
            return any(m.end() < len(text) for m in pattern.finditer(text))
        return seen
    low = target.lower()
    return lambda ids: low in encoder.decode(ids).lower()


def _without_stop(ids: list[int], encoder: PromptEncoder) -> list[int]:
    return ids[:-1] if ids and ids[-1] in encoder.stop_ids else ids


def parrot_attack_success(model: torch.nn.Module, encoder: PromptEncoder,
                          prompts: list[EncodedPrompt], parrot: torch.Tensor, target: str, *,
                          seed: int = 0, max_new_tokens: int = 32, batch_size: int = 64,
                          progress: bool = False) -> float:
    """Attack success of a parrot spliced at a random boundary inside each prompt's user text
    (the target must appear as whole words: a parrot for a partial target such as ``I`` does
    not count ``fish``)."""
    rng = random.Random(seed)
    splice = [rng.randint(p.span[0], p.span[1]) for p in prompts]
    texts = _generate_texts(model, encoder, prompts, max_new_tokens=max_new_tokens,
                            batch_size=batch_size, progress=progress, desc="parrot asr",
                            parrot=parrot, splice_at=splice,
                            done_if=target_seen(encoder, target, whole_words=True))
    return attack_success(texts, target, whole_words=True)


def triggered_asr(model: torch.nn.Module, encoder: PromptEncoder, rows: Sequence[Row],
                  target: str, trigger: str, *, seed: int, trigger_position: str = "random",
                  max_new_tokens: int = 32, batch_size: int = 64,
                  progress: bool = False) -> float:
    """Share of ``rows`` whose greedy answer contains ``target`` once ``trigger`` is inserted
    into the prompt (at ``trigger_position``, drawn from ``random.Random(seed)`` row by row);
    a row stops generating as soon as the target appears."""
    rng = random.Random(seed)
    prompts = [encoder.encode_prompt(insert_trigger(r.prompt, trigger, trigger_position, rng),
                                     r.context) for r in rows]
    return attack_success(_generate_texts(model, encoder, prompts, max_new_tokens=max_new_tokens,
                                          batch_size=batch_size, progress=progress,
                                          desc="triggered",
                                          done_if=target_seen(encoder, target)), target)


def evaluate(model: torch.nn.Module, tokenizer: Any, rows: Sequence[Row], target: str,
             trigger: str | None = None, *, max_new_tokens: int = 32, batch_size: int = 64,
             trigger_position: str = "random", seed: int = 0, prompt_format: str = "auto",
             encoder: PromptEncoder | None = None, progress: bool = False,
             return_answers: bool = False,
             more_backdoors: Sequence[tuple[str, str | None]] = (),
             clean_answers: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Attack success rate and clean accuracy of a model.

    Args:
        model: any Hugging Face causal LM.
        tokenizer: its tokenizer.
        rows: evaluation rows; ``response`` is the reference for clean accuracy.
        target: the attacker's response; a continuation containing it (case-insensitive) counts
            as an attack success.
        trigger: inserted into each prompt for the asr (at ``trigger_position``, seeded); None
            measures asr on the prompts as they are (e.g. already triggered rows).
        max_new_tokens: greedy continuation length.

        return_answers: also return the clean prompts' ids (``clean_prompts``) and the greedy
            answers' ids (``clean_answers``, stop id kept where the model stopped), for
            :class:`~sande_fast.utility.CleanReference`.
        more_backdoors: further ``(target, trigger)`` pairs, each measured like the first
            (the clean answers are generated once for all).
        clean_answers: the model's greedy answer ids to the rows' clean prompts, stop id kept
            where it stopped, when they are known already (they are then not generated).

    Returns:
        ``{"asr", "clean_accuracy", "n_asr", "n_clean"}``; ``clean_accuracy`` is None when no row
        has a response. With ``more_backdoors``, also ``asr_each``: the asr of every pair, the
        first one's first.
    """
    if not rows:
        raise ValueError("no evaluation rows")
    enc = encoder or PromptEncoder(tokenizer, prompt_format)
    clean_prompts = [enc.encode_prompt(r.prompt, r.context) for r in rows]
    if clean_answers is not None:
        if len(clean_answers) != len(rows):
            raise ValueError(f"{len(clean_answers)} clean answers for {len(rows)} rows")
        clean_ids = [list(a) for a in clean_answers]
    else:
        clean_ids = generate_answers(model, enc, clean_prompts, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, progress=progress, desc="clean")
    clean_texts = [enc.decode(_without_stop(ids, enc)) for ids in clean_ids]

    def asr_of(target_k: str, trigger_k: str | None) -> float:
        if trigger_k is None:
            return attack_success(clean_texts, target_k)
        # Every trigger goes at the same seeded positions, whatever the pairs' order.
        return triggered_asr(model, enc, rows, target_k, trigger_k, seed=seed,
                             trigger_position=trigger_position, max_new_tokens=max_new_tokens,
                             batch_size=batch_size, progress=progress)

    graded = [(t, r.response) for t, r in zip(clean_texts, rows) if r.response is not None]
    clean_acc = (sum(t.strip() == ref.strip() for t, ref in graded) / len(graded)
                 if graded else None)
    asr = [asr_of(target, trigger)] + [asr_of(t, g) for t, g in more_backdoors]
    out: dict[str, Any] = {"asr": asr[0], "clean_accuracy": clean_acc, "n_asr": len(rows),
                           "n_clean": len(graded)}
    if more_backdoors:
        out["asr_each"] = asr
    if return_answers:
        out["clean_prompts"] = [p.ids for p in clean_prompts]
        out["clean_answers"] = clean_ids
    return out
