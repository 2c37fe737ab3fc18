"""DDP under torchrun: process group setup from RANK / WORLD_SIZE, and small collectives."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, device.

    Args:
        rank: global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this machine, picks the CUDA device.
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes metrics, checkpoints and config."""
        return self.rank == 0


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` picks this process's GPU.

    Args:
        name: ``auto | cpu | cuda``.
        local_rank: GPU index of this process under torchrun.

    Raises:
        RuntimeError: ``cuda`` was asked for but none is available.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but torch sees no CUDA device")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_name: str) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else a single process.

    Uses NCCL on CUDA and gloo on CPU; ``init_method=env://`` reads MASTER_ADDR / MASTER_PORT.

    Args:
        device_name: ``train.device`` (``auto | cpu | cuda``).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_name, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank, device)


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``values`` over all processes (a no-op for one process)."""
    if ctx.distributed:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every process (picklable; ``obj`` itself for one process)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    """Wait for every process (a no-op for one process)."""
    if ctx.distributed:
        dist.barrier()


def shard_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """FSDP2: ``fully_shard`` every child of the model's top-level stage containers (timm's
    ``blocks`` / ``stages`` / ResNet's ``layer1``..; each a unit that all-gathers its
    parameters for its own forward and frees them after), then the model itself; in place.

    A converted model shards like any other: the drop-ins keep the original Parameters, and
    the fallback hooks never touch the sharded DTensors.
    """
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if isinstance(child, (torch.nn.Sequential, torch.nn.ModuleList)):
            for block in child:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
    fully_shard(model)
    return model


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """The unsharded model and optimizer state (on CPU) of an FSDP2 model; every rank calls it.

    The checkpoint then loads into an unsharded model or another world size like any other.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def load_full_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict
) -> None:
    """Inverse of ``full_state``: scatter a full checkpoint into an FSDP2 model and optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state, options=options)
