"""Tests for ``sande_fast.kernels`` against the plain-torch references.

* The ``torch`` backend runs in this process on CPU, fp32.
* The ``triton`` backend runs on CPU through Triton's interpreter in a *subprocess* with
  ``TRITON_INTERPRET=1`` (the variable must be set before Triton decorates the kernels, which a
  shared pytest process cannot guarantee). The subprocess runs this same file as a script and
  executes the very same case lists with ``backend="triton"``.
* ``@pytest.mark.cuda`` tests run bf16/fp16 and realistic sizes when a GPU is present.

Run: ``.venv/bin/python -m pytest -q tests/test_kernels.py``.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from sande_fast.kernels import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    kernel_backend,
    parrot_splice,
    parrot_splice_reference,
    triton_available,
)

HAS_CUDA = torch.cuda.is_available()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp64; exact-zero references require an exact-zero result."""
    a64, b64 = a.detach().double(), b.detach().double()
    den = b64.norm().item()
    num = (a64 - b64).norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


# ---------------------------------------------------------------------------------------------
# Fused linear cross-entropy
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CECase:
    """One fused-CE configuration (shapes tiny and odd on purpose)."""

    name: str
    rows: int = 3 * 37
    hidden: int = 31
    vocab: int = 123
    ignore_frac: float = 0.8
    chunk_rows: int | None = 7
    reduction: str = "mean"
    normalizer: float | None = None
    logit_scale: float = 1.0
    bias: bool = False
    weight_grad: bool = True
    hidden_grad: bool = True
    tied: bool = False  # the weight also serves as the input embedding table
    ignore_index: int = -100
    strided: bool = False  # hidden and labels are non-contiguous views


CE_CASES = [
    CECase("mean_chunk7_bias", bias=True),
    CECase("sum_frozen_weight", reduction="sum", weight_grad=False, chunk_rows=None),
    CECase("normalizer_scale", normalizer=37.5, logit_scale=0.37, chunk_rows=5, bias=True),
    CECase("chunk1", chunk_rows=1, ignore_frac=0.5),
    CECase("chunk_bigger_than_rows", chunk_rows=1000, ignore_frac=0.3, reduction="sum"),
    CECase("no_ignored_chunk16", ignore_frac=0.0, chunk_rows=16, logit_scale=2.5, bias=True),
    CECase("all_ignored", ignore_frac=1.0, bias=True),
    CECase("all_ignored_normalizer", ignore_frac=1.0, normalizer=4.0),
    CECase("zero_rows", rows=0, chunk_rows=None),
    CECase("tied_weight", tied=True, chunk_rows=3, bias=True),
    CECase("hidden_frozen_weight_trainable", hidden_grad=False, chunk_rows=11),
    CECase("custom_ignore_index", ignore_index=-1, chunk_rows=4, ignore_frac=0.6),
    CECase("vocab_over_block", vocab=4099, hidden=9, rows=23, chunk_rows=6, ignore_frac=0.4),
    CECase("strided_inputs", strided=True, chunk_rows=9, ignore_frac=0.5, bias=True),
    CECase("strided_inputs_no_ignored", strided=True, chunk_rows=8, ignore_frac=0.0),
]


def run_ce_case(case: CECase, backend: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                loss_tol: float = 1e-5, grad_tol: float = 1e-4, seed: int = 0) -> None:
    """Compare loss and grads of the fused op with the reference on one case; raises on mismatch."""
    gen = torch.Generator().manual_seed(seed)
    r, h, v = case.rows, case.hidden, case.vocab
    hidden0 = torch.randn(r, h, generator=gen)
    weight0 = torch.randn(v, h, generator=gen) / h**0.5
    bias0 = torch.randn(v, generator=gen) if case.bias else None
    labels = torch.randint(0, v, (r,), generator=gen)
    labels[torch.rand(r, generator=gen) < case.ignore_frac] = case.ignore_index
    tok_ids = torch.randint(0, v, (r,), generator=gen)  # for the tied-weight embedding lookup
    emb_probe = torch.randn(r, h, generator=gen)

    def leaf(t: torch.Tensor | None, grad: bool) -> torch.Tensor | None:
        if t is None:
            return None
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    def view(t: torch.Tensor) -> torch.Tensor:
        # A non-contiguous view with the same values (every other column / element).
        if not case.strided:
            return t
        if t.dim() == 2:
            return torch.stack([t, torch.zeros_like(t)], dim=2).flatten(1)[:, ::2]
        return torch.stack([t, torch.zeros_like(t)], dim=1).flatten()[::2]

    results = []
    for fn, kw in ((fused_linear_cross_entropy, {"backend": backend}),
                   (fused_linear_cross_entropy_reference, {})):
        hid = leaf(hidden0, case.hidden_grad)
        w = leaf(weight0, case.weight_grad)
        b = leaf(bias0, True)
        assert hid is not None and w is not None
        x = view(hid)
        assert x.is_contiguous() != case.strided or r == 0
        if case.tied:
            # Weight tying: the same [V, H] tensor also embeds the inputs, so its grad is the sum
            # of the LM-head grad and the embedding grad.
            x = hid + torch.nn.functional.embedding(tok_ids.to(device), w)
        loss = fn(x, w, view(labels.to(device)), b, ignore_index=case.ignore_index,
                  reduction=case.reduction, normalizer=case.normalizer,
                  logit_scale=case.logit_scale, chunk_rows=case.chunk_rows, **kw)
        total = loss
        if case.tied:
            total = loss + (torch.nn.functional.embedding(tok_ids.to(device), w).float()
                            * emb_probe.to(device)).sum() * 1e-2
        inputs = [t for t in (hid, w, b) if t is not None and t.requires_grad]
        grads = torch.autograd.grad(total, inputs, allow_unused=True) if inputs else ()
        results.append((loss, inputs, grads))

    (loss_f, in_f, g_f), (loss_r, _, g_r) = results
    assert loss_f.dtype == torch.float32 and loss_f.dim() == 0, (loss_f.dtype, loss_f.shape)
    assert torch.isfinite(loss_f), f"{case.name}: non-finite loss {loss_f}"
    err = rel_err(loss_f, loss_r)
    assert err <= loss_tol, f"{case.name}: loss {loss_f.item()} vs ref {loss_r.item()} (rel {err:.2e})"
    for t, gf, gr in zip(in_f, g_f, g_r):
        assert gf is not None and gr is not None, f"{case.name}: missing grad"
        assert gf.dtype == t.dtype and gf.shape == t.shape, (case.name, gf.dtype, gf.shape)
        assert torch.isfinite(gf).all(), f"{case.name}: non-finite grad"
        e = rel_err(gf, gr)
        assert e <= grad_tol, f"{case.name}: grad {tuple(t.shape)} rel err {e:.2e} > {grad_tol}"


@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: c.name)
def test_fused_ce_torch_matches_reference(case: CECase) -> None:
    run_ce_case(case, "torch")


def test_fused_ce_frozen_weight_gets_no_grad() -> None:
    h = torch.randn(9, 5, requires_grad=True)
    w = torch.randn(11, 5)  # requires_grad False
    b = torch.randn(11)
    loss = fused_linear_cross_entropy(h, w, torch.randint(0, 11, (9,)), b, backend="torch")
    loss.backward()
    assert w.grad is None and b.grad is None and h.grad is not None


@pytest.mark.parametrize("scale", [1.0, 2.5, 0.0])
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_fused_ce_gradients_follow_the_upstream_gradient(scale: float,
                                                         chunk_rows: int | None) -> None:
    """``(scale * loss).backward()`` scales every gradient (the stored [V, H] gradient is
    written by its first chunk, not zero-filled, and skips the multiply at scale 1)."""
    g = torch.Generator().manual_seed(3)
    h0, w0 = torch.randn(10, 6, generator=g), torch.randn(13, 6, generator=g)
    labels = torch.randint(0, 13, (10,), generator=g)
    labels[[1, 7]] = -100
    grads = []
    for fn in (fused_linear_cross_entropy, fused_linear_cross_entropy_reference):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        kw = {"chunk_rows": chunk_rows} if fn is fused_linear_cross_entropy else {}
        (scale * fn(h, w, labels, backend="torch", **kw)).backward()
        grads.append((h.grad, w.grad))
    (gh, gw), (rh, rw) = grads
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)
    assert (float(gw.abs().sum()) == 0.0) == (scale == 0.0)


def test_fused_ce_all_ignored_is_zero_not_nan() -> None:
    h = torch.randn(6, 5, requires_grad=True)
    w = torch.randn(7, 5, requires_grad=True)
    loss = fused_linear_cross_entropy(h, w, torch.full((6,), -100), backend="torch")
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad is not None and w.grad is not None
    assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("bad", [123, -5, 10_000])
def test_fused_ce_label_out_of_range_raises(bad: int) -> None:
    labels = torch.randint(0, 123, (20,))
    labels[3] = bad
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_cross_entropy(torch.randn(20, 8), torch.randn(123, 8), labels, backend="torch")


def test_fused_ce_argument_validation() -> None:
    h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(h, torch.randn(10, 9), y)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(h, w, y, normalizer=0.0)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(h, w, y, chunk_rows=0)
    with pytest.raises(ValueError):
        fused_linear_cross_entropy(h, w, y, backend="cuda")


def test_fused_ce_double_backward_is_refused() -> None:
    # Grads are scaled in place and released after the first backward: a second one must fail
    # loudly rather than return grads scaled twice.
    h = torch.randn(5, 4, requires_grad=True)
    loss = fused_linear_cross_entropy(h, torch.randn(6, 4), torch.randint(0, 6, (5,)), backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward called twice"):
        loss.backward()


def test_fused_ce_grad_output_scaling() -> None:
    h = torch.randn(13, 6, requires_grad=True)
    w = torch.randn(17, 6, requires_grad=True)
    y = torch.randint(0, 17, (13,))
    g_f = torch.autograd.grad(3.5 * fused_linear_cross_entropy(h, w, y, backend="torch"), (h, w))
    g_r = torch.autograd.grad(3.5 * fused_linear_cross_entropy_reference(h, w, y), (h, w))
    for a, b in zip(g_f, g_r):
        assert rel_err(a, b) < 1e-5


# ---------------------------------------------------------------------------------------------
# Parrot splice
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SpliceCase:
    """One splice configuration: input shape, parrot length and per-splice flat starts."""

    name: str
    shape: tuple[int, ...]
    n: int
    starts: tuple[int, ...]
    x_grad: bool = True
    p_grad: bool = True
    strided: bool = False  # token_embeds is a non-contiguous view


SPLICE_CASES = [
    SpliceCase("flat_n1", (50, 31), 1, (0, 7, 49)),
    SpliceCase("flat_n6_unsorted", (41, 17), 6, (30, 2, 15)),
    SpliceCase("batched_n6", (3, 20, 31), 6, (2, 21, 45)),
    SpliceCase("batched_n1_every_row0", (4, 9, 5), 1, (0, 9, 18, 27)),
    SpliceCase("adjacent_splices", (2, 12, 33), 6, (0, 6, 12, 18)),
    SpliceCase("single_splice_wide_h", (13, 1100), 6, (7,)),
    SpliceCase("no_splices", (2, 5, 8), 6, ()),
    SpliceCase("only_parrot_grad", (2, 16, 12), 6, (3, 19), x_grad=False),
    SpliceCase("only_x_grad", (2, 16, 12), 1, (3, 19), p_grad=False),
    SpliceCase("strided_input", (3, 10, 7), 6, (1, 12, 24), strided=True),
]


def run_splice_case(case: SpliceCase, backend: str, device: str = "cpu",
                    x_dtype: torch.dtype = torch.float32, p_dtype: torch.dtype = torch.float32,
                    tol: float = 0.0, seed: int = 0) -> None:
    """Compare the splice output and both grads with the reference; raises on mismatch."""
    gen = torch.Generator().manual_seed(seed)
    h = case.shape[-1]
    x0 = torch.randn(case.shape, generator=gen)
    p0 = torch.randn(case.n, h, generator=gen)
    g0 = torch.randn(case.shape, generator=gen)
    starts = torch.tensor(case.starts, dtype=torch.long, device=device)
    outs = []
    for fn, kw in ((parrot_splice, {"backend": backend}), (parrot_splice_reference, {})):
        x = x0.to(device, x_dtype).requires_grad_(case.x_grad)
        p = p0.to(device, p_dtype).requires_grad_(case.p_grad)
        # Strided case: the same values seen through a transposed (non-contiguous) view.
        xin = x.transpose(-1, -2).contiguous().transpose(-1, -2) if case.strided else x
        assert xin.is_contiguous() != case.strided
        out = fn(xin, p, starts, **kw)
        inputs = [t for t in (x, p) if t.requires_grad]
        grads = torch.autograd.grad(out, inputs, g0.to(device, x_dtype), materialize_grads=True)
        outs.append((out, inputs, grads))
    (o_f, in_f, g_f), (o_r, _, g_r) = outs
    assert o_f.shape == o_r.shape and o_f.dtype == o_r.dtype == x_dtype, (case.name, o_f.shape, o_f.dtype)
    # The forward is a pure copy: it must match exactly in every precision.
    assert torch.equal(o_f, o_r), f"{case.name}: forward differs"
    names = [nm for nm, on in (("x", case.x_grad), ("p", case.p_grad)) if on]
    for nm, t, a, b in zip(names, in_f, g_f, g_r):
        assert a.dtype == t.dtype and a.shape == t.shape, (case.name, a.dtype, a.shape)
        if nm == "x":
            # grad_x is a masked copy of grad_out: exact.
            assert torch.equal(a, b), f"{case.name}: token_embeds grad differs"
        else:
            e = rel_err(a, b)
            assert e <= tol, f"{case.name}: parrot grad rel err {e:.2e} > {tol}"


@pytest.mark.parametrize("case", SPLICE_CASES, ids=lambda c: c.name)
def test_parrot_splice_torch_matches_reference(case: SpliceCase) -> None:
    # Parrot grads sum in a different order than the reference's autograd: allow fp32 rounding.
    run_splice_case(case, "torch", tol=1e-6)


def test_parrot_splice_mixed_dtype_torch() -> None:
    # bf16 embeddings with an fp32 parrot: output in bf16, parrot grad back in fp32. The
    # reference's autograd sums the per-splice grads in bf16, ours in fp32: bf16-level tolerance.
    run_splice_case(SPLICE_CASES[2], "torch", x_dtype=torch.bfloat16, p_dtype=torch.float32, tol=1e-2)


def test_parrot_splice_does_not_touch_input() -> None:
    x = torch.randn(2, 10, 4)
    x_before = x.clone()
    out = parrot_splice(x, torch.randn(3, 4), torch.tensor([1, 12]), backend="torch")
    assert torch.equal(x, x_before) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize(
    ("starts", "parrot_shape", "msg"),
    [((0, 18), (3, 4), "lie in"), ((-1,), (3, 4), "lie in"), ((2, 4), (3, 4), "overlap"),
     ((0,), (3, 5), "parrot must be")],
)
def test_parrot_splice_validation(starts: tuple[int, ...], parrot_shape: tuple[int, int], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        parrot_splice(torch.randn(20, 4), torch.randn(parrot_shape), torch.tensor(starts), backend="torch")


# ---------------------------------------------------------------------------------------------
# Backend selection and import hygiene
# ---------------------------------------------------------------------------------------------
def test_kernel_backend_cpu_is_torch() -> None:
    assert kernel_backend("cpu") == "torch"
    assert kernel_backend(torch.device("cpu")) == "torch"


@pytest.mark.skipif(not triton_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs triton, without the interpreter")
def test_triton_backend_on_cpu_tensor_is_refused() -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        parrot_splice(torch.randn(4, 3), torch.randn(1, 3), torch.tensor([0]), backend="triton")


def test_import_without_triton() -> None:
    # sys.modules["triton"] = None makes `import triton` raise ImportError in the child.
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "import sande_fast.kernels as k\n"
        "assert not k.triton_available() and k.kernel_backend('cuda') == 'torch'\n"
        "h = torch.randn(4, 3, requires_grad=True)\n"
        "k.fused_linear_cross_entropy(h, torch.randn(5, 3), torch.tensor([0, 1, -100, 4])).backward()\n"
        "print(k.parrot_splice(torch.randn(4, 3), torch.randn(2, 3), torch.tensor([1])).shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------------------------------------
# Triton backend under the interpreter (subprocess)
# ---------------------------------------------------------------------------------------------
def _interpreter_main(group: str) -> int:
    """Entry point of the interpreter subprocess: run every case of ``group`` on backend triton."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    failures = []
    checks: list[tuple[str, Callable[[], None]]]
    if group == "ce":
        checks = [(c.name, functools.partial(run_ce_case, c, "triton")) for c in CE_CASES]
    else:
        checks = [(c.name, functools.partial(run_splice_case, c, "triton", tol=1e-6)) for c in SPLICE_CASES]
    for name, check in checks:
        try:
            check()
            print(f"ok   {name}")
        except Exception as exc:  # report every failing case, not only the first
            failures.append(name)
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    return 1 if failures else 0


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
@pytest.mark.parametrize("group", ["ce", "splice"])
def test_triton_backend_under_interpreter(group: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpret", group],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok ") == len(CE_CASES if group == "ce" else SPLICE_CASES), proc.stdout


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ---------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: c.name)
def test_fused_ce_cuda_fp32_small(case: CECase, backend: str) -> None:
    if backend == "triton" and not triton_available():
        pytest.skip("triton not installed")
    # CUDA matmuls may use TF32 for fp32 only when allowed; the default keeps them full fp32.
    run_ce_case(case, backend, device="cuda", loss_tol=1e-5, grad_tol=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize(
    "case",
    [
        CECase("realistic_trainable", rows=4096, hidden=1024, vocab=32000, ignore_frac=0.5,
               chunk_rows=None, bias=True),
        CECase("realistic_frozen_chunked", rows=3000, hidden=1024, vocab=32000, ignore_frac=0.3,
               chunk_rows=700, weight_grad=False, logit_scale=0.5),
        CECase("realistic_many_chunks_normalizer", rows=2500, hidden=512, vocab=32000,
               ignore_frac=0.1, chunk_rows=256, normalizer=5000.0),
    ],
    ids=lambda c: c.name,
)
def test_fused_ce_cuda_half_realistic(case: CECase, dtype: torch.dtype) -> None:
    # Reference and fused both round the logits to the input dtype; grads differ by where the
    # half-precision roundings happen (the reference's grad_logits are fp32 → dtype once).
    run_ce_case(case, "auto", device="cuda", dtype=dtype, loss_tol=2e-3, grad_tol=2e-2)


@pytest.mark.cuda
@needs_cuda
def test_auto_backend_on_cuda_matches_the_reference() -> None:
    # What "auto" runs on a GPU (Triton when it imports) computes the same loss and gradients as
    # the plain-torch reference, on a realistic share of ignored rows.
    torch.manual_seed(0)
    h = torch.randn(300, 128, device="cuda", requires_grad=True)
    w = torch.randn(1000, 128, device="cuda", requires_grad=True)
    y = torch.randint(0, 1000, (300,), device="cuda")
    y[::3] = -100
    loss = fused_linear_cross_entropy(h, w, y, backend="auto")
    ref = fused_linear_cross_entropy_reference(h, w, y)
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
    gh, gw = torch.autograd.grad(loss, (h, w))
    rh, rw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(gh, rh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize(
    ("x_dtype", "p_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
    ids=["fp32", "bf16_fp32parrot", "fp16"],
)
def test_parrot_splice_cuda(backend: str, x_dtype: torch.dtype, p_dtype: torch.dtype) -> None:
    if backend == "triton" and not triton_available():
        pytest.skip("triton not installed")
    for case in SPLICE_CASES + [SpliceCase("realistic", (8, 512, 2048), 20,
                                           tuple(b * 512 + 3 for b in range(8)))]:
        run_splice_case(case, backend, device="cuda", x_dtype=x_dtype, p_dtype=p_dtype,
                        tol=1e-6 if x_dtype == torch.float32 else 1e-2)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--interpret":
        sys.exit(_interpreter_main(sys.argv[2]))
    sys.exit(pytest.main([__file__, "-q"]))
