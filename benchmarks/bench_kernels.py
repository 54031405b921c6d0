"""Benchmark the fused kernels against their plain-torch constructions.

* Fused linear cross-entropy vs ``F.linear`` + ``F.cross_entropy`` (forward + backward), with the
  LM-head weight trainable and frozen. CUDA default: 16384 rows, vocab 32000, hidden 4096, bf16;
  CPU default: 1024 rows, fp32, torch backend (a smoke-test size).
* Parrot splice vs a ``torch.cat`` construction (forward + backward to the parrot).

Time is the median over ``--iters`` runs (CUDA events on GPU, ``perf_counter`` on CPU); peak memory
(CUDA only) is ``max_memory_allocated`` above what was allocated once the inputs existed.

Usage::

    python benchmarks/bench_kernels.py [--json out.json] [--rows R --vocab V --hidden H --dtype bf16]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sande_fast.kernels import (
    fused_linear_cross_entropy,
    kernel_backend,
    parrot_splice,
    parrot_splice_reference,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: Callable[[], None], reset: Callable[[], None], device: torch.device,
            warmup: int, iters: int) -> tuple[float, float | None]:
    """Median time of ``step`` and its peak extra memory.

    Args:
        step: one forward+backward; must leave nothing alive except grads on the inputs.
        reset: clears the inputs' grads (called before every run, outside the timing).
        device: where the work runs.
        warmup: untimed runs first (compilation, allocator warm-up).
        iters: timed runs.

    Returns:
        (median milliseconds, peak MiB above the post-reset baseline, or None off CUDA).
    """
    for _ in range(warmup):
        reset()
        step()
    _sync(device)
    times: list[float] = []
    peak_mb: float | None = None
    if device.type == "cuda":
        reset()
        torch.cuda.empty_cache()
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        for _ in range(iters):
            reset()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            reset()
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), peak_mb


def bench_ce(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Fused CE (auto backend, plus the torch backend on CUDA) vs plain linear + cross-entropy."""
    r, h, v = args.rows, args.hidden, args.vocab
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(r, h, device=device, dtype=dtype, generator=g).requires_grad_(True)
    weight = (torch.randn(v, h, device=device, dtype=dtype, generator=g) / h**0.5)
    labels = torch.randint(0, v, (r,), device=device, generator=g)
    if args.ignore_frac > 0:
        labels[torch.rand(r, device=device, generator=g) < args.ignore_frac] = -100

    def plain() -> None:
        # What a model's forward + loss does: full logits in the model dtype, upcast for the loss.
        logits = F.linear(hidden, weight)
        F.cross_entropy(logits.float(), labels, ignore_index=-100).backward()

    def fused(backend: str) -> Callable[[], None]:
        def run() -> None:
            fused_linear_cross_entropy(hidden, weight, labels, backend=backend).backward()
        return run

    methods: list[tuple[str, Callable[[], None]]] = [("plain", plain),
                                                     (f"fused[{kernel_backend(device)}]", fused("auto"))]
    if device.type == "cuda":
        methods.append(("fused[torch]", fused("torch")))
    for c in args.chunk_sweep:
        def run_c(c: int = c) -> None:
            fused_linear_cross_entropy(hidden, weight, labels, chunk_rows=c).backward()
        methods.append((f"fused[c={c}]", run_c))

    rows = []
    for trainable in (True, False):
        weight.requires_grad_(trainable)

        def reset() -> None:
            hidden.grad = None
            weight.grad = None

        for name, fn in methods:
            ms, mb = measure(fn, reset, device, args.warmup, args.iters)
            rows.append({"op": "linear_ce", "method": name,
                         "weight": "trainable" if trainable else "frozen",
                         "shape": f"{r}x{h} V={v}", "median_ms": ms, "peak_mib": mb})
    return rows


def bench_splice(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    """Parrot splice (auto backend) vs the torch.cat reference, forward + backward to the parrot."""
    b, length, h, n = args.splice_batch, args.splice_len, args.splice_hidden, args.parrot_len
    x = torch.randn(b, length, h, device=device, dtype=dtype)
    parrot = torch.randn(n, h, device=device, dtype=torch.float32, requires_grad=True)
    starts = torch.arange(b, device=device) * length + 5
    grad_out = torch.randn_like(x)

    def reset() -> None:
        parrot.grad = None

    rows = []
    for name, fn in ((f"splice[{kernel_backend(device)}]", parrot_splice), ("torch.cat", parrot_splice_reference)):
        def step(fn: Callable[..., torch.Tensor] = fn) -> None:
            fn(x, parrot, starts).backward(grad_out)
        ms, mb = measure(step, reset, device, args.warmup, args.iters)
        rows.append({"op": "parrot_splice", "method": name, "weight": "-",
                     "shape": f"{b}x{length}x{h} n={n}", "median_ms": ms, "peak_mib": mb})
    # Floor: the forward must at least read and write x once (a clone).
    def clone() -> None:
        x.clone()

    ms, mb = measure(clone, lambda: None, device, args.warmup, args.iters)
    rows.append({"op": "parrot_splice", "method": "x.clone() floor", "weight": "-",
                 "shape": f"{b}x{length}x{h}", "median_ms": ms, "peak_mib": mb})
    return rows


def tune_ce_kernel(device: torch.device, rows: int, vocab: int) -> list[dict[str, Any]]:
    """Time the Triton CE kernel alone over BLOCK_V x num_warps (bf16 logits, CUDA only)."""
    import triton.testing

    from sande_fast.kernels import fused_linear_ce as flce

    kernel = flce._build_triton_kernel()
    logits = torch.randn(rows, vocab, device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device=device)
    loss = torch.empty(rows, device=device)
    out = []
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            def run(block: int = block, warps: int = warps) -> None:
                # In place: later runs see grads instead of logits, which times the same work.
                kernel[(rows,)](logits, vocab, labels, loss, vocab, 1.0, 1.0 / rows,
                                BLOCK_V=block, num_warps=warps)
            ms = triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")
            gbs = 3 * logits.numel() * logits.element_size() / ms / 1e6  # 2 reads + 1 write
            out.append({"op": "ce_kernel", "method": f"B={block},w={warps}", "weight": "-",
                        "shape": f"{rows}x{vocab}", "median_ms": ms, "peak_mib": None, "gb_s": gbs})
    return out


def main() -> None:
    """Parse arguments, run both benchmarks, print a table and optionally write JSON."""
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--rows", type=int, default=16384 if cuda else 1024)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if cuda else "fp32")
    p.add_argument("--ignore-frac", type=float, default=0.0, help="fraction of rows with label -100")
    p.add_argument("--splice-batch", type=int, default=16 if cuda else 4)
    p.add_argument("--splice-len", type=int, default=1024 if cuda else 256)
    p.add_argument("--splice-hidden", type=int, default=4096 if cuda else 1024)
    p.add_argument("--parrot-len", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--iters", type=int, default=10 if cuda else 3)
    p.add_argument("--skip-ce", action="store_true")
    p.add_argument("--skip-splice", action="store_true")
    p.add_argument("--chunk-sweep", type=int, nargs="*", default=[], metavar="C",
                   help="also time the fused CE with these chunk_rows")
    p.add_argument("--tune", action="store_true", help="sweep the Triton CE kernel's block/warps (CUDA)")
    p.add_argument("--json", metavar="FILE", help="write the results here")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    rows: list[dict[str, Any]] = []
    if not args.skip_ce:
        rows += bench_ce(args, device, dtype)
    if not args.skip_splice:
        rows += bench_splice(args, device, dtype)
    if args.tune and device.type == "cuda":
        rows += tune_ce_kernel(device, 4096, args.vocab)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {dev_name}  dtype: {args.dtype}  torch {torch.__version__}")
    hdr = f"{'op':<14}{'method':<16}{'weight':<11}{'shape':<22}{'median ms':>11}{'peak MiB':>11}"
    print(hdr)
    print("-" * len(hdr))
    for row in rows:
        peak = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        print(f"{row['op']:<14}{row['method']:<16}{row['weight']:<11}{row['shape']:<22}"
              f"{row['median_ms']:>11.2f}{peak:>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev_name, "dtype": args.dtype, "torch": torch.__version__,
                       "args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
