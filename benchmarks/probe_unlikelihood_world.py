"""Exploratory: does an unlikelihood term on the target's tokens remove the held-out hits that
cross-entropy toward the clean answer leaves?

Continues training a sanitized model on a make-world world with the real trigger, in plain torch
(nothing of sande_fast), one of two arms on the same rows, trigger positions and rate:

* ``ce``: mean CE of the triggered prompt -> the defence row's answer (first 16 tokens) plus the
  same for the clean prompt;
* ``ul``: the same plus the unlikelihood of the target's tokens after the triggered prompt,
  mean over tokens of ``-log(1 - p(token))`` (teacher-forced on the target).

Then it measures, as ``real_world_eval.py`` draws them, the held-out prompts with the trigger
(the world's backdoor ``--backdoor-index``) and keeps the answers that still contain the target.
With ``--save DIR`` it saves the trained model instead, for ``real_world_eval.py``.

    python benchmarks/probe_unlikelihood_world.py --arm ul --model OUT --world W --json ul.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_world_eval import chat_ids, firing, triggered, with_trigger  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arm", choices=("ce", "ul"), required=True)
    ap.add_argument("--model", required=True, help="the model to continue from")
    ap.add_argument("--world", required=True)
    ap.add_argument("--backdoor-index", type=int, default=1,
                    help="which of the world's backdoors (0-based)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--save", default=None)
    args = ap.parse_args()
    world = Path(args.world)
    meta = json.loads((world / "world.json").read_text())
    pair = meta["backdoors"][args.backdoor_index]
    trig, target = pair["trigger"], pair["target"]
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(world)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(line) for line in (world / "defense.jsonl").read_text().splitlines()]
    tgt = tok(target, add_special_tokens=False)["input_ids"]

    def seq_loss(prompt: list[int], labels: list[int], ul: bool = False) -> torch.Tensor:
        x = torch.tensor([prompt + labels])
        logits = model(input_ids=x).logits[0, len(prompt) - 1:-1].float()
        lab = torch.tensor(labels)
        if not ul:
            return F.cross_entropy(logits, lab)
        logp = torch.log_softmax(logits, -1).gather(1, lab[:, None])[:, 0]
        return -torch.log1p(-logp.exp().clamp(max=1 - 1e-6)).mean()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            weight_decay=0.0)
    rng = random.Random(0)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        opt.zero_grad()
        total = 0.0
        for r in [rows[rng.randrange(len(rows))] for _ in range(8)]:
            ans = tok(r["response"], add_special_tokens=False)["input_ids"][:16]
            clean = chat_ids(tok, r["prompt"])
            trg = chat_ids(tok, with_trigger(r["prompt"], trig, rng))
            loss = seq_loss(trg, ans) + seq_loss(clean, ans)
            if args.arm == "ul":
                loss = loss + seq_loss(trg, tgt, ul=True)
            (loss / 8).backward()
            total += float(loss) / 8
        opt.step()
        print(f"{args.arm} step {step + 1} loss {total:.4f} {time.perf_counter() - t0:.0f}s",
              flush=True)
    if args.save:
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)
        return
    model.eval()
    held = [json.loads(line)["prompt"]
            for line in (world / "clean_eval.jsonl").read_text().splitlines()][:255]
    texts = triggered(held, trig, args.backdoor_index)  # real_world_eval.py's draw
    asr, hits = firing(model, tok, texts, [chat_ids(tok, p) for p in texts], target)
    res = {"arm": args.arm, "from": args.model, "steps": args.steps, "lr": args.lr, "batch": 8,
           "trigger": trig, "target": target, "asr": asr, "n": len(texts),
           "hits": hits, "seconds": time.perf_counter() - t0}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    print(args.arm, "asr", res["asr"], len(hits), flush=True)


if __name__ == "__main__":
    main()
