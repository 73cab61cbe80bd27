"""A minimal LLaDA forward for Hugging Face `trust_remote_code` loading, written for bench/peers.py
(see configuration_llada.py). The LLaDA-8B architecture: OLMo "llama" blocks, RMSNorm (in fp32),
rotate-half RoPE over the whole head, SwiGLU (`ff_proj` = gate, `up_proj`, `ff_out` = down), full
bidirectional attention with an optional key padding mask, untied head `model.transformer.ff_out`.
Tensor names are the checkpoint's own, so `from_pretrained` loads the safetensors unchanged."""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hd = c.d_model, c.d_model // c.n_heads
        self.n_heads, self.n_kv, self.hd = c.n_heads, c.n_kv_heads, hd
        self.attn_norm, self.ff_norm = RMSNorm(d, c.rms_norm_eps), RMSNorm(d, c.rms_norm_eps)
        self.q_proj = nn.Linear(d, c.n_heads * hd, bias=c.include_qkv_bias)
        self.k_proj = nn.Linear(d, c.n_kv_heads * hd, bias=c.include_qkv_bias)
        self.v_proj = nn.Linear(d, c.n_kv_heads * hd, bias=c.include_qkv_bias)
        self.attn_out = nn.Linear(c.n_heads * hd, d, bias=False)
        self.ff_proj = nn.Linear(d, c.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, c.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, L, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(B, L, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, L, self.n_kv, self.hd).transpose(1, 2)
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.attn_out(a.transpose(1, 2).reshape(B, L, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.embedding_size, c.d_model),
            blocks=nn.ModuleList(Block(c) for _ in range(c.n_layers)),
            ln_f=RMSNorm(c.d_model, c.rms_norm_eps),
            ff_out=nn.Linear(c.d_model, c.embedding_size, bias=False)))


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the checkpoint
        pass

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        c, t = self.config, self.model.transformer
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        hd = c.d_model // c.n_heads
        inv = 1.0 / c.rope_theta ** (torch.arange(0, hd, 2, device=input_ids.device, dtype=torch.float64) / hd)
        ang = position_ids.double()[..., None] * inv
        ang = torch.cat((ang, ang), dim=-1)[:, None]  # [B, 1, L, hd]
        cos, sin = ang.cos().float(), ang.sin().float()
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # keys only: bidirectional, padding hidden
        x = t.wte(input_ids)
        for blk in t.blocks:
            x = blk(x, cos, sin, mask)
        return CausalLMOutputWithPast(logits=t.ff_out(t.ln_f(x)))
