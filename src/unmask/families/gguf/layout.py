"""What llama.cpp's converter (convert_hf_to_gguf.py) writes that the reader undoes and the writer
redoes: the architectures unmask has a family for, the tensor names, and the q/k row order.

For the `llama` and `llada` architectures (llama.cpp applies "normal", interleaved RoPE to them) the
rows of q and k (weights and biases) are permuted per head from Hugging Face's rotate-half order
(first half, second half) to interleaved pairs: within each head, row 2j holds HF row j and row 2j+1
holds HF row j + head_dim/2 (k uses the kv head count). `_unpermute` restores the HF order (`_permute`
is the converter's direction, used by `write_gguf`). Qwen2/Qwen3/Dream use llama.cpp's "neox" RoPE,
which is rotate-half: no permutation.
"""
from __future__ import annotations

import torch

from ...config import ModelConfig
from ...errors import UserError
from ..spec import NameMap

# GGUF architecture -> (our family's model_type, whether llama.cpp permuted the q/k rows)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "llada": ("llada", True),
    "dream": ("Dream", False),
}

# Our tensor names <-> llama.cpp's (the same for every architecture above).
NAMES = NameMap([
    ("embed.weight", "token_embd.weight"),
    ("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.attn.q_proj.{w}", "blk.{i}.attn_q.{w}"),
    ("layers.{i}.attn.k_proj.{w}", "blk.{i}.attn_k.{w}"),
    ("layers.{i}.attn.v_proj.{w}", "blk.{i}.attn_v.{w}"),
    ("layers.{i}.attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    ("layers.{i}.attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    ("layers.{i}.mlp_norm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
])
_IGNORED = (".attn_rot_embd.weight",)  # precomputed RoPE tables some old files carry; we compute our own


def import_gguf():
    """The gguf package (llama.cpp's Python reader and writer)."""
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency of unmask
        raise UserError("reading GGUF files needs the gguf package: pip install 'gguf>=0.10'") from None
    return gguf


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp's interleaved order, per head (the converter's step)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved row order -> HF rotate-half order, per head (undoes `_permute`)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _heads_of(ours: str, cfg: ModelConfig) -> int | None:
    """How many heads the rows of a permuted tensor hold (None: not permuted)."""
    if ".attn.q_proj." in ours:
        return cfg.n_heads
    if ".attn.k_proj." in ours:
        return cfg.kv_heads
    if ours.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
        return 1
    return None
