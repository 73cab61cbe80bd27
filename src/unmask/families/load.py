"""Load the network of any registered family from its checkpoint directory, lazily.

`load_network` builds the `Transformer` on the meta device, checks that the weights will fit, then
reads the checkpoint tensor by tensor (memory-mapped), converts each to the target dtype and device
and assigns it, so the model is never held twice. Nothing in the directory is executed: `auto_map`
(the checkpoint's own Python) is ignored, and a config that can only be loaded through it is refused.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..model import Transformer
from . import registry
from .checkpoint import CheckpointReader
from .spec import FamilySpec, read_json

KEEP_FP32 = ("expert_bias",)  # routing biases stay float32 whatever the model dtype (routing is fp32)
_RECOMPUTED = ("rotary_emb.inv_freq",)  # buffers some checkpoints store; we compute our own
_MARGIN = 0.05  # activations and allocator slack on top of the weights, as a share of them ...
_MARGIN_MIN = 256 * 2**20  # ... and at least this much


def read_config(path: str | os.PathLike) -> tuple[dict, FamilySpec]:
    """config.json of a checkpoint directory and the family it declares (UserError if none fits)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: model directory not found")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise UserError(f"{path}: no config.json; not a model directory")
    raw = read_json(cfg_file)
    model_type = raw.get("model_type")
    if model_type is None:
        if raw.get("auto_map"):
            raise UserError(f"{cfg_file}: no model_type, only auto_map (the checkpoint loads by running its own "
                            f"code, which unmask never does); supported model_types: {', '.join(registry.supported())}")
        raise UserError(f"{cfg_file}: no model_type; supported model_types: {', '.join(registry.supported())}")
    try:
        return raw, registry.get(model_type)
    except UserError as e:
        raise UserError(f"{cfg_file}: {e}") from None


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: MemAvailable on Linux, the CUDA allocator's free memory;
    None where it cannot be told (then nothing is checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def estimate_bytes(cfg: ModelConfig, shapes: dict[str, torch.Size], dtype: torch.dtype) -> int:
    """What the loaded network occupies: its tensors at the target dtype plus the RoPE tables."""
    size = torch.empty((), dtype=dtype).element_size()
    params = sum(math.prod(s) * (4 if n.endswith(KEEP_FP32) else size) for n, s in shapes.items())
    return params + 2 * cfg.max_seq_len * (cfg.rotary_dim or cfg.head_dim) // 2 * 4


def _check_memory(path: Path, need: int, device: torch.device) -> None:
    need = need + max(int(need * _MARGIN), _MARGIN_MIN)
    have = available_memory(device)
    if have is not None and need > have:
        raise UserError(f"{path}: loading needs about {need / 2**30:.2f} GiB on {device} but only "
                        f"{have / 2**30:.2f} GiB is available; free memory, use a smaller dtype or another device")


def cast(name: str, t: torch.Tensor, dtype: torch.dtype | None,
         device: torch.device | None = None) -> torch.Tensor:
    """A checkpoint tensor in `dtype` (floating ones; None: as stored; routing biases stay float32) on
    `device` (None: where it is)."""
    if t.is_floating_point() and dtype is not None:
        t = t.to(device=device, dtype=torch.float32 if name.endswith(KEEP_FP32) else dtype)
    elif device is not None:
        t = t.to(device=device)
    # A slice of a fused tensor (LLaDA2's query_key_value) must not keep sharing its storage.
    return t.clone() if t._base is not None else t


def meta_network(cfg: ModelConfig) -> tuple[Transformer, dict[str, torch.Size]]:
    """The network of `cfg` on the meta device, and the shapes of the tensors a checkpoint of it holds
    (no lm_head when the embeddings are tied)."""
    with torch.device("meta"):
        net = Transformer(cfg)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return net, shapes


def install(net: Transformer, cfg: ModelConfig, state: dict[str, torch.Tensor], device: torch.device) -> Transformer:
    """`net` (from `meta_network`) holding `state`, its head tied if `cfg` says so, RoPE tables on
    `device`, in eval mode."""
    net.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        net.lm_head.weight = net.embed.weight
    net.reset_rope(device)
    return net.eval()


def read_state(path: Path, cfg: ModelConfig, spec: FamilySpec, shapes: dict[str, torch.Size],
               convert: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors of the checkpoint directory `path`, through `spec`'s adapter and `convert` one at a
    time; a tensor of the wrong shape or one config.json does not account for is a UserError."""
    state: dict[str, torch.Tensor] = {}
    with CheckpointReader(path) as reader:
        for name, t in spec.state_from_hf(reader, cfg, shapes):
            if name not in shapes:
                raise RuntimeError(f"{spec.name} adapter produced {name}, which the network does not have")
            if t.shape != shapes[name]:
                raise UserError(f"{path}: tensor {name} has shape {tuple(t.shape)} but config.json implies "
                                f"{tuple(shapes[name])}; config.json does not match the weights")
            state[name] = convert(name, t)
        extra = [n for n in reader.unused() if not n.endswith(_RECOMPUTED)]
        if extra:
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise UserError(f"{reader.file_of(extra[0])}: unexpected tensor {extra[0]}{more} that config.json does "
                            "not account for; config.json does not match the weights")
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise RuntimeError(f"{spec.name} adapter did not produce {missing[:3]}")
    return state


def load_network(path: str | os.PathLike, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> tuple[Transformer, ModelConfig, FamilySpec, dict]:
    """The network of a checkpoint directory in any registered family's layout.

    Returns (net in eval mode on `device` in `dtype`, its ModelConfig, the FamilySpec, config.json as
    read). Raises a one-line UserError for anything wrong with the directory: unknown or missing
    model_type, missing or corrupt shards, tensors missing, unexpected or of the wrong shape, or not
    enough memory.
    """
    path, device = Path(path), torch.device(device)
    raw, spec = read_config(path)
    cfg = spec.config_from_hf(raw, path)
    net, shapes = meta_network(cfg)
    _check_memory(path, estimate_bytes(cfg, shapes, dtype), device)
    state = read_state(path, cfg, spec, shapes, lambda name, t: cast(name, t, dtype, device))
    return install(net, cfg, state, device), cfg, spec, raw
