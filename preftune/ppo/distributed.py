"""Data-parallel PPO across processes: ``torchrun --nproc-per-node N -m preftune.cli ppo ...``.

Each process samples its own share of every rollout batch (``batch_size / N`` prompts, its own
random stream), computes its gradients, and the gradients are averaged with an all-reduce before
every optimiser step -- exactly what ``DistributedDataParallel`` does, done by hand because the
LoRA reference trick (``disable_adapter()`` on the live model) and the separate-critic adapter
switch do not go through a DDP wrapper. gloo on CPU (what CI exercises), NCCL on GPUs. Process 0
alone logs to MLflow, writes checkpoints and publishes the policy; guards and SIGTERM are decided
collectively so no process is left waiting in an all-reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """Processes requested by the launcher (torchrun / deepspeed set WORLD_SIZE), else 1."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init_distributed(device_type: str) -> DistContext:
    """Join the process group the launcher describes (no-op for a single process)."""
    import torch.distributed as dist

    world = launched_world_size()
    if world <= 1:
        return DistContext(rank=0, world_size=1, local_rank=0, initialized_here=False)
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), False)
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.initialized_here:
        import torch.distributed as dist

        dist.destroy_process_group()


def device_for(ctx: DistContext, device: Any) -> Any:
    """One GPU per process (cuda:LOCAL_RANK); CPU stays CPU."""
    import torch

    if device.type == "cuda" and ctx.world_size > 1:
        return torch.device("cuda", ctx.local_rank)
    return device
