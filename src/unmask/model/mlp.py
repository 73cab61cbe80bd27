"""The feed-forward half of a block: the dense SwiGLU, or a mixture of SwiGLU experts (MoE).

Both take any (..., d) input: (B, T, d) for an ordinary forward, (N, d) for the packed rows of a
ragged engine batch.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig, MoEConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Scores every expert for every token and picks `top_k` of them (MoEConfig has the rule).

    Not an nn.Linear on purpose: it always runs in float32 (an fp32 routing decision is part of the
    model's definition), and transforms that rewrite linear layers (int8 quantization, LoRA,
    the CPU kernels) must leave it alone.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, d_model))
        if cfg.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, d) -> (weights (N, top_k) float32, experts (N, top_k) int64)."""
        c = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if c.score_function == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.expert_bias is None else scores + self.expert_bias.float()
        if c.n_group > 1:
            n = x.shape[0]
            grouped = choice.view(n, c.n_group, -1)
            best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)  # (N, groups)
            keep = torch.zeros_like(best, dtype=torch.bool)
            keep.scatter_(1, best.topk(c.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        experts = choice.topk(c.top_k, dim=-1).indices
        weights = scores.gather(1, experts)
        if c.norm_topk_prob and c.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, experts


class MoE(nn.Module):
    """Routed SwiGLU experts plus optional shared ones.

    The forward groups tokens by expert: the (token, expert) pairs are sorted by expert id, and each
    expert that got tokens runs one batched SwiGLU over all of them (a loop over active experts, never
    over tokens). Outputs are weighted and summed back into their tokens with one index_add.
    Counting the tokens per expert is a host sync, so this layer does not run inside a CUDA graph.
    """

    def __init__(self, d_model: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(d_model, cfg)
        self.experts = nn.ModuleList(MLP(d_model, cfg.expert_hidden) for _ in range(cfg.n_experts))
        self.shared = MLP(d_model, cfg.expert_hidden * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if x.shape[0] == 0:
            return x.reshape(shape)
        weights, experts = self.router(x)
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // self.cfg.top_k  # the token of each sorted (token, expert) pair
        counts = torch.bincount(flat, minlength=self.cfg.n_experts).tolist()
        xs = x[token]
        ys = []
        start = 0
        for e, n in enumerate(counts):
            if n:
                ys.append(self.experts[e](xs[start:start + n]))
            start += n
        y = torch.cat(ys) * weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, token, y)
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)


def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
    """The dense SwiGLU, or the MoE from layer `moe.first_k_dense` on."""
    if cfg.moe is not None and layer >= cfg.moe.first_k_dense:
        return MoE(cfg.d_model, cfg.moe)
    return MLP(cfg.d_model, cfg.hidden)
