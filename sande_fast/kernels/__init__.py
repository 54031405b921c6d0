"""Fused kernels for SANDE training: supervised-row linear cross-entropy and the parrot splice.

Each op has three implementations behind one ``backend`` switch:

* ``"triton"``: Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` for tests);
* ``"torch"``: the same chunked maths in plain torch (what runs on CPU in production);
* a ``*_reference`` function: the obvious, memory-hungry construction used as the test oracle.

``backend="auto"`` picks ``kernel_backend(tensor.device)``. Importing this package never imports
Triton: it is imported the first time a Triton kernel is needed, so the package works on machines
without Triton or a GPU.
"""
from __future__ import annotations

from .backend import kernel_backend, triton_available
from .fused_linear_ce import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from .parrot_splice import parrot_splice, parrot_splice_reference

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "parrot_splice",
    "parrot_splice_reference",
    "triton_available",
    "kernel_backend",
]
