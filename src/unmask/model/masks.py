"""Attention masks as boolean tensors (True = may attend), built from absolute positions.

Building them from positions rather than from indices lets the same functions serve a full sequence,
a query block against a KV cache, and the doubled `x_t ⊕ x_0` training sequence.
"""
import torch


def block_causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Bidirectional inside a block, causal across blocks. Blocks are aligned at absolute multiples of
    `block_size`, so a request's block boundaries never depend on where its prompt ends.

    q_pos: (..., T), k_pos: (..., S) -> (..., T, S)
    """
    return (k_pos // block_size).unsqueeze(-2) <= (q_pos // block_size).unsqueeze(-1)


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    return k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)
