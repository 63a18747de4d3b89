"""Data-parallel PPO across processes: ``torchrun --nproc-per-node N -m preftune.cli ppo ...``.

Each process samples its own share of every rollout batch (``batch_size / N`` prompts, its own
random stream), computes its gradients, and the gradients are averaged with an all-reduce before
every optimiser step -- exactly what ``DistributedDataParallel`` does, done by hand because the
LoRA reference trick (``disable_adapter()`` on the live model) and the separate-critic adapter
switch do not go through a DDP wrapper. gloo on CPU (what CI exercises), NCCL on GPUs. Process 0
alone logs to MLflow, writes checkpoints and publishes the policy; guards and SIGTERM are decided
collectively so no process is left waiting in an all-reduce.

Every collective the trainer needs is a method of :class:`DistContext` (averages, sums and counts,
"does any process ...", gradient all-reduce, parameter broadcast, the replica check, gathering
objects), and each is a no-op for a single process, so the trainer reads the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def of(cls, rank: int = 0, world_size: int = 1) -> DistContext:
        """The context of an already-joined process group (or of a single process)."""
        return cls(rank=rank, world_size=world_size, local_rank=0, initialized_here=False)

    # -- collectives (no-ops for one process) ----------------------------------------------------

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world_size

    def sum_counts(self, sums: list[float], counts: list[float]) -> tuple[list[float], list[float]]:
        """Element-wise sums and counts over every process (one all-reduce)."""
        if self.world_size == 1:
            return sums, counts
        import torch.distributed as dist

        t = torch.tensor(sums + counts, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        v = t.tolist()
        return v[: len(sums)], v[len(sums) :]

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on at least one."""
        if self.world_size == 1:
            return flag
        import torch.distributed as dist

        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(float(t) > 0)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Data parallel: average gradients over processes (what DDP's all-reduce does)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= self.world_size

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        """Data parallel: every process starts from rank 0's weights."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)

    def check_replicas(self, params: list[torch.nn.Parameter]) -> None:
        """Data parallel: the processes must end with the same weights (the gradient all-reduce worked)."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        from preftune.errors import PreftuneError

        with torch.no_grad():
            total = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
        lo, hi = total.clone(), total.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if float(hi - lo) > 1e-6 * max(1.0, abs(float(hi))):
            raise PreftuneError(
                f"data-parallel replicas ended with different weights (checksums {float(lo)} vs {float(hi)})"
            )

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


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
    if device.type == "cuda" and ctx.world_size > 1:
        return torch.device("cuda", ctx.local_rank)
    return device
