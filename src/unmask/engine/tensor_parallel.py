"""Tensor-parallel serving: each layer's attention heads and MLP split across the ranks of a
torchrun job with DTensor's `parallelize_module` (Megatron's layout), the KV cache split by heads,
and one scheduler on rank 0 that drives every rank's forward.

    q/k/v, gate/up projections   ColwiseParallel  (each rank computes its share of heads / hidden units)
    o, down projections          RowwiseParallel  (partial sums, all-reduced into the block's output)
    embeddings, norms, LM head   replicated       (every rank holds them; only rank 0's logits are used)

Rank 0 runs the engine (scheduler, decode plan, sampling, HTTP). Each forward's host inputs
(engine/cuda_graphs.StepInputs: ids, positions, mask, cache slots) are broadcast to the other
ranks, which run the same forward on their shard and their own slice of the KV cache: the cache's
page bookkeeping lives on rank 0 only, since every slot a forward writes or reads comes with its
inputs. The model code never knows; parallelism is applied from outside, as in training.

Use it when a model does not fit one device. For throughput with a model that fits, run
independent replicas behind a load balancer instead (docs/serving-at-scale.md).
"""
from __future__ import annotations

from dataclasses import fields

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import UserError
from .cuda_graphs import StepInputs, run_net

_FIELDS = [f.name for f in fields(StepInputs)]
_STOP, _STEP = 0, 1
_HEADER = 1 + len(_FIELDS) * 5  # command, then per field: present, ndim, up to 3 sizes


def check_divides(cfg, world: int, where: str = "--tensor-parallel") -> None:
    """One clear line when `world` ranks cannot split this model's heads and MLP evenly."""
    if world < 1:
        raise UserError(f"{where} {world}: must be at least 1")
    if getattr(cfg, "moe", None) is not None:
        raise UserError(f"{where} {world}: this model has mixture-of-experts layers, which tensor parallelism "
                        "does not split yet; serve it on one device or as replicas")
    for name, n in (("attention heads", cfg.n_heads), ("key/value heads", cfg.kv_heads),
                    ("MLP hidden units", cfg.hidden)):
        if n % world:
            raise UserError(f"{where} {world}: the model's {n} {name} do not split evenly over {world} ranks; "
                            f"choose a world size that divides {n}")


def precheck(model_path, world: int) -> None:
    """Before any rank starts: the model's heads and MLP split over `world` ranks (its config only)."""
    from pathlib import Path

    from ..families.gguf import find_gguf
    from ..families.load import read_config
    from ..pretrained import default_model_dir

    path = Path(model_path) if model_path is not None else default_model_dir()
    if find_gguf(path) is not None:
        return  # the ranks check it once they read the file
    raw, spec = read_config(path)
    check_divides(spec.config_from_hf(raw, path), world)


def shard(net: nn.Module, world: int, device: torch.device):
    """Split every block of `net` over the `world` ranks of the default process group, in place.
    Returns the device mesh. The attention modules are told their local head counts."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    check_divides(net.config, world)
    mesh = init_device_mesh(device.type, (world,))
    plan = {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(), "attn.v_proj": ColwiseParallel(),
            "attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for block in net.layers:
        parallelize_module(block, mesh, plan)
        block.attn.n_heads //= world
        block.attn.n_kv //= world
    net.to(device)
    net.tensor_parallel = world  # what the engine reads (local KV heads, options that cannot apply)
    return mesh


def degree(net: nn.Module) -> int:
    return getattr(net, "tensor_parallel", 1)


def local_kv_heads(net: nn.Module, cfg) -> int:
    return cfg.kv_heads // degree(net)


class Driver:
    """Rank 0's side: `run(net, cache, x)` sends the forward's inputs to every rank, then runs its own
    share (the all-reduces inside the row-parallel layers meet the other ranks there)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stopped = False

    @classmethod
    def start(cls, cache, device: torch.device) -> "Driver":
        """Tell the workers (waiting in `worker`) the KV cache's shape, so that each builds its own
        slice of the same pages; then drive them."""
        shape = [0, 0] if cache is None else [cache.n_pages, cache.page_size]
        dist.broadcast(torch.tensor(shape, dtype=torch.long, device=device), src=0)
        return cls(device)

    @staticmethod
    def fail(device: torch.device) -> None:
        """Rank 0 could not build its engine: release the workers waiting in `worker`."""
        dist.broadcast(torch.tensor([-1, -1], dtype=torch.long, device=device), src=0)

    def run(self, net, cache, x: StepInputs) -> torch.Tensor:
        _send(x, self.device)
        return run_net(net, cache, x)

    def stop(self) -> None:
        """Release the workers (their loop returns). Call once, when the engine is done."""
        if dist.is_initialized() and not self.stopped:
            self.stopped = True
            header = torch.zeros(_HEADER, dtype=torch.long, device=self.device)
            dist.broadcast(header, src=0)


def _send(x: StepInputs, device) -> None:
    header = torch.zeros(_HEADER, dtype=torch.long)
    header[0] = _STEP
    tensors = []
    for i, name in enumerate(_FIELDS):
        t = getattr(x, name)
        if t is None:
            continue
        if t.dim() > 3:
            raise ValueError(f"StepInputs.{name} has {t.dim()} dimensions; the broadcast carries at most 3")
        header[1 + 5 * i: 3 + 5 * i] = torch.tensor([1, t.dim()])
        header[3 + 5 * i: 3 + 5 * i + t.dim()] = torch.tensor(t.shape)
        tensors.append(t.to(device, torch.uint8 if t.dtype == torch.bool else torch.long))
    dist.broadcast(header.to(device), src=0)
    for t in tensors:
        dist.broadcast(t.contiguous(), src=0)


def _receive(device) -> StepInputs | None:
    header = torch.zeros(_HEADER, dtype=torch.long, device=device)
    dist.broadcast(header, src=0)
    h = header.tolist()
    if h[0] == _STOP:
        return None
    values = {}
    for i, name in enumerate(_FIELDS):
        present, ndim = h[1 + 5 * i], h[2 + 5 * i]
        if not present:
            values[name] = None
            continue
        shape = h[3 + 5 * i: 3 + 5 * i + ndim]
        dtype = torch.uint8 if name == "mask" else torch.long
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, src=0)
        values[name] = t.bool() if name == "mask" else t
    return StepInputs(**values)


def worker(model) -> int:
    """A rank other than 0, once rank 0 builds its engine: make this rank's slice of the KV cache,
    then run every forward rank 0 sends until it says stop. Returns how many forwards ran."""
    from .kv_cache import PagedKVCache

    device, cfg = model.device, model.config
    shape = torch.zeros(2, dtype=torch.long, device=device)
    dist.broadcast(shape, src=0)
    n_pages, page = shape.tolist()
    if n_pages < 0:  # rank 0 failed to start (Driver.fail)
        return 0
    cache = None
    if n_pages:
        dtype = next(model.net.parameters()).dtype
        cache = PagedKVCache(cfg.n_layers, local_kv_heads(model.net, cfg), cfg.head_dim, (n_pages - 1) * page, page,
                             device, dtype if dtype.is_floating_point else torch.float32)
    return worker_loop(model.net, cache, device)


@torch.inference_mode()
def worker_loop(net, cache, device: torch.device) -> int:
    """Run every forward rank 0 sends until it says stop. Returns the count."""
    n = 0
    while (x := _receive(device)) is not None:
        run_net(net, cache, x)
        n += 1
    return n


def share(value: int, device) -> int:
    """Rank 0's `value` on every rank (the KV budget, which only rank 0 decides)."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(t, src=0)
    return int(t.item())
