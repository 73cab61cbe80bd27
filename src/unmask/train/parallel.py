"""Data parallelism applied to a model from outside: DDP, or FSDP2 (`fully_shard`: parameters,
gradients and optimizer state sharded over the ranks, each transformer block its own unit), with
bf16 mixed precision on CUDA and optional activation checkpointing. The model code never knows.

Checkpoints stay in one format for every way of training (train/checkpoint.py: safetensors and
JSON, no pickle): the full state is gathered with torch.distributed.checkpoint's state-dict API
(`get_state_dict` / `set_state_dict`, full_state_dict) and written by rank 0, so a run saved by N
ranks resumes on M ranks, with or without FSDP, and a single process can resume it too. (The cost:
rank 0 holds one full copy of the weights and optimizer state in CPU memory while it writes.)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UserError

MODES = ("none", "ddp", "fsdp")


def parallelize(net: nn.Module, mode: str, world: int, device: torch.device, activation_checkpointing: bool = False
                ) -> nn.Module:
    """The module to run forward and backward through (`net` itself for "none")."""
    if mode not in MODES:
        raise UserError(f"--parallel {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none" and world > 1:
        raise UserError(f"this run has {world} ranks (torchrun) but --parallel none; use ddp or fsdp")
    if activation_checkpointing:
        _checkpoint_blocks(net)
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(net) if world > 1 else net
    if mode == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if world > 1 or torch.distributed.is_initialized():
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
                if device.type == "cuda" else MixedPrecisionPolicy()
            for block in net.layers:
                fully_shard(block, mp_policy=mp)
            fully_shard(net, mp_policy=mp)
        return net
    return net


def resolve(mode: str, world: int) -> str:
    """"auto" -> ddp with several ranks, a plain single process otherwise."""
    return mode if mode != "auto" else ("ddp" if world > 1 else "none")


def sync_gradients(run: nn.Module, sync: bool):
    """A context in which backward() does (sync) or does not (an accumulation micro-batch that is not
    the last) reduce gradients over the ranks: DDP's no_sync, FSDP2's set_requires_gradient_sync."""
    import contextlib

    if sync:
        return contextlib.nullcontext()
    if hasattr(run, "no_sync"):
        return run.no_sync()
    if hasattr(run, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def off():
            run.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                run.set_requires_gradient_sync(True)
        return off()
    return contextlib.nullcontext()


def gather_model(net: nn.Module, build, main: bool):
    """`net` itself, or for an FSDP-sharded one a plain copy with the full weights (a collective:
    every rank calls it; ranks other than the main one get None). build() -> a fresh plain module."""
    if not is_sharded(net):
        return net
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    plain = build()
    plain.load_state_dict(full, strict=False)
    return plain


def scalar(t: torch.Tensor) -> float:
    """A float of a tensor that may be a DTensor (FSDP's gradient norm)."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


def _checkpoint_blocks(net: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i, block in enumerate(net.layers):
        net.layers[i] = checkpoint_wrapper(block)


def is_sharded(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def full_state(net: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state as full tensors on the CPU, keyed by parameter name (a collective:
    every rank calls it). The optimizer's is {name: {exp_avg, exp_avg_sq, step}}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model, optim = get_state_dict(net, opt, options=opts)
    return model, optim.get("state", {})  # ranks other than 0 get empty dicts (cpu_offload)


def load_full_state(net: nn.Module, opt: torch.optim.Optimizer, model: dict, optim_state: dict, groups: list) -> None:
    """The inverse of `full_state`: every rank passes the full tensors; each keeps its shard. groups:
    the saved param_groups without their "params" (each group's parameter names are taken from `opt`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_state_dict

    names = get_optimizer_state_dict(net, opt)["param_groups"]  # each group's parameter names, as set_state_dict wants
    groups = [{**g, "params": n["params"]} for g, n in zip(groups, names)]
    set_state_dict(net, opt, model_state_dict=model, optim_state_dict={"state": optim_state, "param_groups": groups},
                   options=StateDictOptions(full_state_dict=True, strict=False))
