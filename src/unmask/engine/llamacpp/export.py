"""The GGUF file the llama.cpp runner loads: the engine's network, laid out as llama.cpp's `llama`
architecture, its weights in the requested type, cached by content.

The runner feeds input embeddings computed by the network itself (so inputs llama.cpp has no
notion of, such as `token_shift`'s neighbour embeddings, stay in PyTorch) and reads logits; the
file therefore carries the layers, the final norm and the output head, and no tokenizer. Files live
under $UNMASK_CACHE_DIR (default ~/.cache/unmask)/llamacpp, named by a hash of the weights, the
config and the type, so an engine over the same model starts without rewriting it.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ...errors import UserError

FORMAT = 1  # bump when the file layout written here changes
TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}
_NOT_IN_GGUF = ("prev_embed.", "gap_embed.")  # token_shift tables: the runner applies them in PyTorch


def cache_dir() -> Path:
    return Path(os.environ.get("UNMASK_CACHE_DIR") or Path.home() / ".cache" / "unmask") / "llamacpp"


def _supported(cfg) -> None:
    """llama's architecture covers our transformer without its optional features."""
    unsupported = [name for name, on in (
        ("qkv_bias", cfg.qkv_bias), ("qk_norm", cfg.qk_norm),
        ("mixture of experts", cfg.moe is not None),
        ("partial rotary embeddings", cfg.rotary_dim not in (None, cfg.head_dim)),
    ) if on]
    if unsupported:
        raise UserError(f"backend 'llama.cpp' runs models of the llama shape; this one has {', '.join(unsupported)}: "
                        f"use backend='torch'")


def runner_gguf(net: torch.nn.Module, cfg, weights: str = "f32") -> Path:
    """Path of the GGUF for `net` with weights in `weights` (f32, f16, q8_0), written if missing."""
    from ...families.gguf.write import write_gguf_net

    if weights not in TYPES:
        raise UserError(f"llama.cpp weights {weights!r}: choose one of {', '.join(TYPES)}")
    _supported(cfg)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(_NOT_IN_GGUF)}
    if any(not v.is_floating_point() for v in state.values()):
        raise UserError("backend 'llama.cpp' takes the unquantised model: drop quantize='int8wo' and pick "
                        "llama.cpp weights (f32, f16, q8_0) instead")
    # The cache key is the content: the weights' own bytes in their own dtype (no fp32 copy of a bf16
    # model just to hash it), with each tensor's name, dtype and shape.
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps([FORMAT, weights, cfg.model_dump(mode="json")], sort_keys=True).encode())
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    out = cache_dir() / f"{h.hexdigest()}-{weights}.gguf"
    if out.is_file():
        return out
    state = {k: v.detach().to("cpu", torch.float32) for k, v in state.items()}
    return write_gguf_net(state, cfg, out, TYPES[weights], arch="llama", vocab=None, name="unmask-runner")
