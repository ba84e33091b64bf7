"""Scale-out with PyTorch's own stack: process groups from torchrun's environment, DDP or FSDP2
(``fully_shard`` per transformer block, then the root), activation checkpointing and per-block compile.

Launch (one process per device; the same command on every node):
    torchrun --nproc-per-node 8 -m sslpt pretrain CONFIG --set train.parallel=fsdp --run-dir runs/x --resume auto
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id JOB ...
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint

from sslpt.engine.models.vit import Block

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a build without torch.distributed: nothing is ever a DTensor
    DTensor = ()


class DistributedSetupError(RuntimeError):
    """The process group could not be set up; the message says what to check."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False   # this run created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``/``cuda`` pick this process's GPU (LOCAL_RANK under torchrun), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DistributedSetupError(f"train.device={name!r} but no CUDA GPU is available to this process "
                                        f"(torch.cuda.is_available() is False): use train.device=cpu, or auto to "
                                        f"take a GPU when there is one")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def _rendezvous_hint(rank: int, world_size: int, timeout_s: int) -> str:
    addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
    return (f"rank {rank} of {world_size} could not join the process group at {addr}:{port} within {timeout_s} s. "
            "Check that: every node runs the same torchrun command (same --nnodes, --nproc-per-node, --rdzv-id); "
            "--rdzv-endpoint / MASTER_ADDR names a host that every node can reach and MASTER_PORT is open in its "
            "firewall and not used by another job; the first node has started. Raise train.dist_timeout_s if "
            "nodes start far apart.")


def init_distributed(parallel: str, device_name: str, timeout_s: int) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    A group the caller already created (tests with mp.spawn) is used as it is. ``parallel=ddp|fsdp`` without
    torchrun runs one process in a group of one, so the same config works on a single device.
    """
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if parallel == "none":
        if env_world > 1:
            raise DistributedSetupError(
                f"train.parallel='none' but this is one of {env_world} processes (WORLD_SIZE={env_world}, "
                "torchrun?): set train.parallel=ddp or fsdp, or run a single process without torchrun")
        return DistInfo(device=resolve_device(device_name))
    if not dist.is_available():
        raise DistributedSetupError(f"train.parallel={parallel!r} needs torch.distributed, which this build lacks")
    if env_world > 1 and device_name.startswith("cuda:"):
        raise DistributedSetupError(f"train.device={device_name!r} would put all {env_world} processes on one GPU; "
                                    "use train.device=auto or cuda (each process takes GPU LOCAL_RANK)")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        device = resolve_device(device_name, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistInfo(rank, world, local_rank, device, owns_group=False)
    device = resolve_device(device_name, local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:   # not under torchrun: a group of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout, **kwargs)
        return DistInfo(0, 1, 0, device, owns_group=True)
    rank = int(os.environ["RANK"])
    try:
        dist.init_process_group(backend, init_method="env://", timeout=timeout, **kwargs)
    except (RuntimeError, TimeoutError, ValueError) as err:   # DistNetworkError/DistStoreError are RuntimeErrors
        raise DistributedSetupError(f"{_rendezvous_hint(rank, env_world, timeout_s)} ({type(err).__name__}: "
                                    f"{str(err).splitlines()[0] if str(err) else ''})") from err
    return DistInfo(rank, dist.get_world_size(), local_rank, device, owns_group=True)


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def configure_process(train_cfg, device: torch.device) -> None:
    """Process-wide settings a run needs before it builds anything: CPU threads and deterministic algorithms."""
    if device.type == "cpu" and train_cfg.cpu_threads:
        torch.set_num_threads(train_cfg.cpu_threads)
    if train_cfg.deterministic:
        set_determinism()


def set_determinism() -> None:
    """PyTorch's deterministic algorithms (an error where an op has none), cuBLAS workspace, no cuDNN autotuning.
    Checked bit-exact on CPU; our own Triton/CUDA kernels are outside this switch (see their tests)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def broadcast_object(value, info: DistInfo):
    """Rank 0's ``value`` on every rank (e.g. the run folder, so ranks agree on one timestamped name)."""
    if not info.initialized or info.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.initialized and info.world_size > 1:
        dist.barrier()


# ---------------------------------------------------------------- model wrapping

def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """Every transformer block (``engine.models.vit.Block``) inside ``module``, students and teachers alike."""
    return [m for m in module.modules() if isinstance(m, Block)]


def _checkpointed(forward):
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def wrap_blocks(objective: nn.Module, *, activation_checkpointing: bool, compile: bool,
                compile_backend: str = "inductor") -> None:
    """Activation checkpointing (trainable blocks) and torch.compile (all blocks), applied to each block's
    ``forward`` in place. Wrapping the method rather than the module keeps parameter names and checkpoints
    unchanged and leaves FSDP's hooks outside the compiled graph (torchtitan's order: checkpoint, compile,
    shard). Shapes are static (``dynamic=False``): the visible-token count is fixed by the mask ratio."""
    trainable = {id(b) for b in transformer_blocks(objective.trainable)}
    for block in transformer_blocks(objective):
        forward = block.forward
        if activation_checkpointing and id(block) in trainable:
            forward = _checkpointed(forward)
        if compile:
            forward = torch.compile(forward, fullgraph=True, dynamic=False, backend=compile_backend)
        if forward is not block.forward:
            block.forward = forward


def mixed_precision_policy(precision: str):
    """FSDP2: gather parameters in the compute dtype, reduce gradients in fp32. Inputs are not cast (autocast
    still runs on top, keeping normalisations, softmax and the loss targets in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "fp32":
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)


def apply_fsdp(objective: nn.Module, info: DistInfo, precision: str, reshard_after_forward: bool) -> None:
    """``fully_shard`` each transformer block (students' and EMA teachers', so their shards line up for the
    sharded EMA update), then the objective as the root (embeddings, norms, heads, mask tokens). The objective's
    ``forward`` is the training entry; ``evaluate`` is registered so FSDP gathers the root for it too."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = mixed_precision_policy(precision)
    trainable = {id(b) for b in transformer_blocks(objective.trainable)}
    for block in transformer_blocks(objective):
        # frozen (teacher) blocks never run a backward, so keeping their gathered weights would only cost memory
        reshard = reshard_after_forward if id(block) in trainable else True
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(objective, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    register_fsdp_forward_method(objective, "evaluate")


def apply_ddp(objective: nn.Module, info: DistInfo) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # buffers are fixed (position embeddings) or copied from the student (teachers): no per-step broadcast
    return DistributedDataParallel(objective, device_ids=device_ids, broadcast_buffers=False)


def parallelize(objective: nn.Module, train_cfg, info: DistInfo) -> nn.Module:
    """Wrap ``objective`` for ``train.parallel``; returns the module whose call runs a training forward
    (the DDP wrapper, or the objective itself, sharded in place under FSDP). EMA teachers must be re-paired
    with their students afterwards (``engine.ema.rebind_teachers``)."""
    t = train_cfg
    if t.parallel != "fsdp" and not t.reshard_after_forward:
        warnings.warn("train.reshard_after_forward has no effect unless train.parallel=fsdp", stacklevel=2)
    wrap_blocks(objective, activation_checkpointing=t.activation_checkpointing, compile=t.compile,
                compile_backend=t.compile_backend)
    model = objective
    if t.parallel == "fsdp":
        apply_fsdp(objective, info, t.precision, t.reshard_after_forward)
    elif t.parallel == "ddp":
        model = apply_ddp(objective, info)
    return model


def gradient_sync(model: nn.Module, enabled: bool):
    """A context in which backward does (or, when accumulating, does not) reduce gradients across ranks."""
    from contextlib import nullcontext

    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameter or gradient); plain tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class ShardAwareGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose overflow check covers every rank's gradient shard (FSDP2): the per-device
    ``found_inf`` flags are all-reduced (MAX), so all ranks skip the same steps. PyTorch's own
    ``torch.distributed.fsdp.sharded_grad_scaler.ShardedGradScaler`` keeps its flag with shape [1], which the
    fused AdamW's sync-free skip rejects (it wants a 0-dim flag, as ``torch.amp.GradScaler`` makes)."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        per_device = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        for flag in per_device.values():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return per_device


def negatives_group():
    """The default process group when several ranks train together (contrastive negatives from every rank),
    else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None
