"""Which kernel implementation runs: Triton (CUDA, or the interpreter in tests) or plain torch."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

__all__ = ["triton_available", "kernel_backend", "resolve_backend"]


@functools.cache
def triton_available() -> bool:
    """Whether Triton can be imported in this process.

    Returns:
        True when ``import triton`` succeeds (the result is cached).
    """
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install (e.g. missing libs) counts as "not available"
        return False
    return True


def kernel_backend(device: torch.device | str) -> str:
    """The backend ``backend="auto"`` picks for tensors on ``device``.

    Args:
        device: a torch device (or its string form).

    Returns:
        ``"triton"`` for CUDA devices when Triton imports, else ``"torch"``.
    """
    device = torch.device(device)
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user ``backend`` argument to ``"triton"`` or ``"torch"`` (shared by both ops).

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``"triton"`` asked for where it cannot run.
    """
    if backend == "auto":
        return kernel_backend(device)
    if backend == "torch":
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' requested but triton cannot be imported")
        # Off-GPU, Triton only runs through its interpreter (used by the tests).
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (got {device.type}); "
                "set TRITON_INTERPRET=1 before importing sande_fast.kernels to run it on CPU"
            )
        return "triton"
    raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
