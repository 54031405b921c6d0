"""Sanitize a model sharded with PyTorch FSDP2 across processes and machines.

    torchrun --nproc_per_node N -m sande_fast sanitize ... --fsdp

How the work is split (every rank runs the same :class:`~sande_fast.recipe.Sanitizer`):

* Sharding (torchtune's habit): ``fully_shard`` on every decoder layer, then on the
  :class:`~sande_fast.adapter.ModelAdapter` as the root. The root's own parameters (embedding,
  final norm, LM head) exist only inside the adapter's forward, so the fast loss, the embedding
  lookups and the model calls of generation all go through it (typed requests to its forward).
* Data: every rank draws the same global batch (same seeded sampler); the loss engine gives each
  rank a strided share and keeps the global label count as the normaliser, so the per-rank losses
  add up to the one-process loss. FSDP is set to SUM gradients (not average) for that reason.
  Ranks with fewer micro-batches run zero-weight fillers, because FSDP's all-gathers and
  reduce-scatters happen inside every forward and backward.
* Stage 1: the parrot is a small replicated parameter; its gradient is all-reduced (SUM) while the
  frozen model stays sharded. Stage 2 trains the sharded model; AdamW steps on the shards.
* Evaluation: each rank generates a strided share of the prompts; the ranks agree on the early
  stop and gather the answers, so every rank computes the same metrics.
* Output: the full state dict is gathered one tensor at a time to rank 0's CPU (the other ranks
  keep nothing), rank 0 writes the Hugging Face folder into the temporary sibling of ``--out``
  and renames it only after every rank has reported success.

The backend follows the device: gloo on CPU, nccl on CUDA.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import BadInputError

if TYPE_CHECKING:
    from .adapter import ModelAdapter

__all__ = ["Collective", "Sharded", "decoder_layers", "full_state_dict", "init_distributed",
           "local_device", "run_sharded", "save_sharded", "shard"]

_LOG = logging.getLogger(__name__)

T = TypeVar("T")


class Collective:
    """The few collectives the loss engine, the parrot step and generation need under FSDP.

    Every method is a collective: all ranks must call it, in the same order.

    Args:
        device: where the tensors of collectives live (CUDA for nccl, CPU for gloo).
        mixed_precision: recorded for the report.
        group: the process group (default: the world).
    """

    def __init__(self, device: torch.device, mixed_precision: bool = False,
                 group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.mixed_precision = mixed_precision

    # -- splitting work --------------------------------------------------------------------------
    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's strided share of a sequence that every rank holds in full."""
        return list(items[self.rank::self.world_size])

    def padded_share(self, n: int) -> list[int]:
        """This rank's strided share of ``range(n)``, padded (with repeats) to the same length on
        every rank so that all ranks run the same number of batches."""
        idx = list(range(self.rank, n, self.world_size))
        per_rank = -(-n // self.world_size)
        return idx + [idx[0] if idx else 0] * (per_rank - len(idx))

    def gather_share(self, local: Sequence[T], n: int) -> list[T]:
        """Inverse of :meth:`padded_share`: every rank gets all ``n`` results in order."""
        real = len(range(self.rank, n, self.world_size))
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, list(local[:real]), group=self.group)
        out: list[Any] = [None] * n
        for r, part in enumerate(parts):
            out[r::self.world_size] = part
        return out

    # -- reductions ------------------------------------------------------------------------------
    def _reduce(self, value: float, op: dist.ReduceOp, dtype: torch.dtype) -> float:
        t = torch.tensor([value], dtype=dtype, device=self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return t.item()

    def max_float(self, value: float) -> float:
        return self._reduce(value, dist.ReduceOp.MAX, torch.float64)

    def max_int(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        return int(self._reduce(value, dist.ReduceOp.MAX, torch.int64))

    def sum_float(self, value: float) -> float:
        """The sum of ``value`` over the ranks (in float64, so a loss is not rounded twice)."""
        return float(self._reduce(value, dist.ReduceOp.SUM, torch.float64))

    def all_true(self, flag: bool) -> bool:
        """True when ``flag`` is true on every rank."""
        return bool(self._reduce(int(flag), dist.ReduceOp.MIN, torch.int64))

    def all_reduce_sum(self, param: torch.Tensor) -> None:
        """Sums ``param.grad`` over the ranks in place (a rank without a gradient adds zeros)."""
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=self.group)

    def embedding_rows(self, weight: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of a row-sharded (``Shard(0)``) embedding, without gathering it whole.

        Each rank fills the rows it holds into zeros and the ranks sum: exact, and only
        ``len(index)`` rows ever travel.
        """
        if not hasattr(weight, "to_local"):  # not sharded
            return weight[index.to(weight.device)]
        local = weight.to_local()
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device)
                 for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([local.shape[0]], device=self.device),
                        group=self.group)
        start = sum(int(s.item()) for s in sizes[:self.rank])
        out = torch.zeros((index.numel(), local.shape[1]), dtype=local.dtype,
                          device=self.device)
        for j, i in enumerate(index.tolist()):
            if start <= i < start + local.shape[0]:
                out[j] = local[i - start]
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    # -- bookkeeping -----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What report.json records about the run's distribution."""
        return {"fsdp": 2, "world_size": self.world_size,
                "backend": dist.get_backend(self.group),
                "mixed_precision": "bf16 params, fp32 reduce" if self.mixed_precision else None}


# -- set-up ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` (made current) on CUDA, else ``device``."""
    if device.type != "cuda":
        return device
    if "LOCAL_RANK" in os.environ:
        index = int(os.environ["LOCAL_RANK"])
    else:
        index = dist.get_rank() % torch.cuda.device_count() if dist.is_initialized() else 0
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(device: torch.device) -> bool:
    """Initialises the default process group unless it exists; returns whether it did.

    The backend follows the device: nccl on CUDA, gloo on CPU. Under torchrun the rendezvous
    comes from its environment; a process started without it becomes a one-rank group.
    """
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        local_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1)
    return True


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (its ``_no_split_modules`` classes), innermost
    first; falls back to the entries of its longest ``ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
        layers = list(max(lists, key=len)) if lists else []
    # fully_shard must run bottom-up; modules() lists parents before their children.
    return layers[::-1]


def shard(adapter: ModelAdapter, device: torch.device, *,
          mixed_precision: bool = False) -> Collective:
    """Shards a :class:`~sande_fast.adapter.ModelAdapter` with FSDP2 over the default process
    group (a collective) and returns its :class:`Collective` (also set as
    ``adapter.collective``).

    ``fully_shard`` on every decoder layer, then on the adapter as the root; gradients are
    summed over the ranks (the sharded engine's per-rank losses are already divided by the
    global label count). Decide packing before this
    (:func:`~sande_fast.engine.choose_packing` runs the unsharded model), then build the engine
    with :func:`~sande_fast.engines.build_engine` and ``collective=`` the result.

    Args:
        adapter: the adapter of the model, not yet sharded.
        device: this rank's device (see :func:`local_device`).
        mixed_precision: CUDA only: bf16 parameters in compute, fp32 gradient reduction (the
            sharded master weights stay in their dtype).

    Raises:
        BadInputError: mixed precision off CUDA.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if mixed_precision and device.type != "cuda":
        raise BadInputError("FSDP mixed precision (bf16) needs CUDA")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision else MixedPrecisionPolicy())
    for layer in decoder_layers(adapter.model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # Reshard the root after forward too: outside a forward every parameter is then a shard,
    # which is what the optimiser, the frozen() toggles and the state-dict gather expect.
    fully_shard(adapter, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    for module in adapter.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # gloo has no PREMUL_SUM; a plain SUM with the (no-op) factor of 1 works everywhere.
            module.set_force_sum_reduction_for_comms(True)
    adapter.collective = Collective(device, mixed_precision=mixed_precision)
    return adapter.collective


# -- output ----------------------------------------------------------------------------------------
@torch.no_grad()
def full_state_dict(module: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The full state dict of a sharded module on rank 0's CPU (a collective; other ranks get
    an empty dict).

    Tensors are gathered one at a time and moved to CPU at once, so rank 0 never holds more than
    one full copy, and tied parameters (one tensor under two names) are gathered once.
    ``torch.distributed.checkpoint``'s ``get_model_state_dict(full_state_dict=True,
    cpu_offload=True)`` does the same but gathers a tied embedding twice.

    Args:
        dtype: cast floating-point tensors to this dtype on the way (e.g. bf16 for a run with
            mixed precision and fp32 master weights whose user asked for a bf16 model).
    """
    rank0 = dist.get_rank() == 0
    out: dict[str, Any] = {}
    seen: dict[int, Any] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            if rank0:
                out[name] = seen[id(t)]
            continue
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        cpu = None
        if rank0:
            cast = dtype if dtype is not None and full.is_floating_point() else full.dtype
            cpu = full.detach().to("cpu", cast, copy=True)
            out[name] = cpu
        seen[id(t)] = cpu
        del full
    return out


def save_sharded(model: nn.Module, tokenizer: Any, out: str | os.PathLike,
                 state: dict[str, Any] | None = None, progress: bool = False) -> None:
    """Saves a sharded Hugging Face model in the same layout as one process does (a collective:
    every rank calls it; rank 0 writes).

    Args:
        model: the sharded ``PreTrainedModel`` (``result.model`` of an FSDP ``sanitize``).
        state: the gathered state dict (see :func:`full_state_dict`); gathered here if None.
    """
    from .io import hf_quiet

    if state is None:
        state = full_state_dict(model)
    if dist.get_rank() != 0:
        return
    with hf_quiet(progress):
        model.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
        dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        if len(dtypes) == 1 and (saved := dtypes.pop()) != model.dtype:
            # save_pretrained records the dtype of the parameters (fp32 master shards under mixed
            # precision), not of the tensors it wrote: fix config.json so loading keeps them.
            model.config.dtype = str(saved).removeprefix("torch.")
            model.config.save_pretrained(out)
    stray = [f for f in os.listdir(out) if f.endswith((".bin", ".pt", ".pth"))]
    if stray:
        raise RuntimeError(f"unexpected non-safetensors weight files written: {stray}")


# -- a sanitize job on every rank ------------------------------------------------------------------
class Sharded:
    """The world of an FSDP job (see :mod:`sande_fast.job`): rank 0 writes, every rank loads on
    the CPU and runs the same recipe, and the ranks agree on usage errors and on success."""

    fsdp = True
    load_device = torch.device("cpu")  # fully_shard moves each rank's shards to its device

    def __init__(self, device: torch.device, mixed_precision: bool) -> None:
        self.device = device
        self.mixed_precision = mixed_precision
        self.writer = dist.get_rank() == 0

    def agree(self, error: str | None) -> None:
        """Every rank stops with the same usage error if any rank found one (lowest rank's)."""
        errors: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise BadInputError(first)

    def gather(self, model: nn.Module) -> dict[str, Any]:
        return full_state_dict(model, torch.bfloat16 if self.mixed_precision else None)

    def save_model(self, model: nn.Module, tokenizer: Any, out: Any, state: dict[str, Any],
                   progress: bool) -> None:
        save_sharded(model, tokenizer, out, state, progress=progress)
        state.clear()

    def confirm(self, ok: bool) -> bool:
        """True when every rank says ``ok`` (a collective)."""
        return Collective(self.device).all_true(ok)


def run_sharded(run: Callable[[Sharded], int], device: torch.device, dtype: str | None) -> int:
    """``sande-fast sanitize ... --fsdp``: one rank of a torchrun job (or a lone process).

    Every rank loads the model and data and runs the same job; rank 0 writes ``--out``
    (atomically, and only after all ranks succeeded). A failure on any rank makes every rank
    exit non-zero and leaves ``--out`` untouched. Usage errors are printed by rank 0 only.

    Args:
        run: runs the job in the given world (:func:`sande_fast.job.run_job`).
        device: the run's device (this rank's CUDA device is picked from it).
        dtype: the dtype the model was asked for; bf16 on CUDA keeps fp32 master shards and
            computes in bf16 (FSDP mixed precision), and the saved model is bf16.
    """
    started = init_distributed(device)
    rank = dist.get_rank()
    mixed = device.type == "cuda" and str(dtype).lower() in ("bfloat16", "bf16")
    try:
        code = run(Sharded(local_device(device), mixed))
    except BadInputError:
        if rank != 0:
            return 2
        raise
    else:
        if started:
            _settle()
        return code
    finally:
        if started:
            dist.destroy_process_group()


# How long a finished rank waits for the others before tearing the group down anyway.
SETTLE_TIMEOUT = datetime.timedelta(seconds=120)


def _settle() -> None:
    """Waits until every rank has finished its work before the group is destroyed.

    A rank that destroys its gloo group while a peer still has traffic in flight to it can make
    the peer's transport threads abort the process ("terminate called without an active
    exception") after the job itself succeeded. The wait is a monitored barrier with a timeout,
    so a peer that died instead of finishing cannot hang this rank; a failed wait is logged and
    the teardown goes on. nccl has no monitored barrier, and a plain one would hang on a dead
    peer, so it is left as it was (the abort was seen on gloo only).
    """
    if dist.get_world_size() == 1 or dist.get_backend() != "gloo":
        return
    try:
        dist.monitored_barrier(timeout=SETTLE_TIMEOUT)
    except RuntimeError as exc:
        _LOG.warning("ranks did not all finish together: %s", exc)
