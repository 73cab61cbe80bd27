"""Process-group set-up for torchrun. Parallelism is applied to the model from outside (DDP wrap);
the model code itself never knows how many ranks there are."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.clone()
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            x /= self.world
        return x

    def any_true(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank, so that every rank takes the same branch."""
        if self.world == 1:
            return flag
        t = torch.tensor(int(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        local, device = int(os.environ.get("LOCAL_RANK", "0")), torch.device("cpu")
    if world == 1:
        return Dist(device=device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), world, local, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def leave() -> None:
    """Leave the process group once every rank is here. Callers drop what holds the group first (DDP /
    FSDP wrappers, tensor-parallel modules): one outliving it aborted a gloo rank at exit ("terminate
    called without an active exception")."""
    import gc

    if dist.is_initialized():
        dist.barrier()
    gc.collect()
    shutdown()
