"""The network features other checkpoint families need (config.py ArchConfig): explicit head width,
q/k/v biases, per-head q/k norms, partial and scaled RoPE, mixture-of-experts layers. Each must leave
today's models unchanged and work on every forward path (KV cache, packed rows)."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from conftest import tiny_config
from unmask.config import MoEConfig, RopeScaling
from unmask.model import Transformer, block_causal_mask
from unmask.model.mlp import MoE
from unmask.model.rope import apply_rope, inv_frequencies, rope_tables

MOE = MoEConfig(n_experts=8, top_k=2, expert_hidden=16, n_shared_experts=1, first_k_dense=1, n_group=4,
                topk_group=2, routed_scaling_factor=2.5, expert_bias=True)
RICH = dict(d_model=32, n_heads=4, n_kv_heads=2, head_size=12, qkv_bias=True, qk_norm=True, rotary_dim=8,
            rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_position_embeddings=16), moe=MOE,
            n_layers=3)


def randomized(cfg, seed=0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
        for name, b in m.named_buffers():
            if name.endswith("expert_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return m


# ---- config ------------------------------------------------------------------------------------
def test_defaults_keep_todays_parameters():
    m = Transformer(tiny_config())
    names = {k.split(".", 2)[-1] for k in m.state_dict() if k.startswith("layers.0.")}
    assert names == {"attn_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
                     "attn.o_proj.weight", "mlp_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                     "mlp.down_proj.weight"}
    assert m.config.head_dim == 8 and m.config.family == "unmask" and m.config.logit_shift == 0


def test_head_size_decouples_q_width_from_d_model():
    cfg = tiny_config(d_model=30, n_heads=4, head_size=10)  # 30 is not divisible by 4: fine with head_size
    m = Transformer(cfg)
    assert m.layers[0].attn.q_proj.weight.shape == (40, 30)
    assert m.layers[0].attn.o_proj.weight.shape == (30, 40)
    assert m(torch.randint(0, 40, (1, 5))).shape == (1, 5, 40)
    with pytest.raises(ValidationError, match="divisible"):
        tiny_config(d_model=30, n_heads=4)
    with pytest.raises(ValidationError, match="rotary_dim"):
        tiny_config(rotary_dim=12)  # head_dim is 8


def test_moe_config_is_validated():
    with pytest.raises(ValidationError, match="divisible"):
        MoEConfig(n_experts=6, top_k=2, expert_hidden=4, n_group=4)
    with pytest.raises(ValidationError, match="top_k"):
        MoEConfig(n_experts=8, top_k=5, expert_hidden=4, n_group=4, topk_group=2)


# ---- RoPE --------------------------------------------------------------------------------------
def test_unscaled_tables_are_todays_tables():
    hd, n, theta = 16, 50, 10000.0
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # the formula unmask always had
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    cos, sin = rope_tables(hd, n, theta)
    assert torch.equal(cos, angles.cos().float()) and torch.equal(sin, angles.sin().float())
    cos2, sin2 = rope_tables(hd, n, theta, rotary_dim=None, scaling=None)
    assert torch.equal(cos2, cos) and torch.equal(sin2, sin)


@pytest.mark.parametrize("factor", [2.0, 4.0, 0.5])
def test_linear_scaling_is_positions_divided_by_factor(factor):
    hd, n, theta = 16, 40, 10000.0
    cos, sin = rope_tables(hd, n, theta, scaling=RopeScaling(type="linear", factor=factor))
    inv, _ = inv_frequencies(hd, theta)
    angles = torch.outer(torch.arange(n, dtype=torch.float64) / factor, inv)
    torch.testing.assert_close(cos, angles.cos().float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, angles.sin().float(), rtol=0, atol=1e-6)


def test_dynamic_ntk_grows_the_base_only_past_the_original_context():
    hd, theta, f = 16, 10000.0, 2.0
    scaling = RopeScaling(type="dynamic", factor=f, original_max_position_embeddings=32)
    base, _ = inv_frequencies(hd, theta)
    short, attn = inv_frequencies(hd, theta, scaling, seq_len=32)
    assert torch.equal(short, base) and attn == 1.0
    long, _ = inv_frequencies(hd, theta, scaling, seq_len=128)
    grown = theta * (f * 128 / 32 - (f - 1)) ** (hd / (hd - 2))
    torch.testing.assert_close(long, inv_frequencies(hd, grown)[0])
    assert long[0] == base[0] and (long[1:] < base[1:]).all()  # lower frequencies: longer wavelengths


def test_yarn_properties():
    hd, theta = 32, 10000.0
    base, _ = inv_frequencies(hd, theta)
    same, attn = inv_frequencies(hd, theta, RopeScaling(type="yarn", factor=1.0, original_max_position_embeddings=64))
    torch.testing.assert_close(same, base)
    assert attn == 1.0
    s = 8.0
    yarn = RopeScaling(type="yarn", factor=s, original_max_position_embeddings=64)
    inv, attn = inv_frequencies(hd, theta, yarn)
    assert inv[0] == base[0]  # the fastest rotation is kept (extrapolated)
    torch.testing.assert_close(inv[-1], base[-1] / s)  # the slowest is interpolated
    assert ((inv <= base * (1 + 1e-12)) & (inv >= base / s * (1 - 1e-12))).all()
    assert attn == pytest.approx(0.1 * math.log(s) + 1)
    cos, _ = rope_tables(hd, 8, theta, scaling=yarn)
    assert cos[0, 0].item() == pytest.approx(attn)  # the attention scale is folded into cos and sin
    both = RopeScaling(type="yarn", factor=s, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0)
    assert inv_frequencies(hd, theta, both)[1] == 1.0


def test_partial_rotary_leaves_the_other_dims_alone():
    x = torch.randn(2, 3, 5, 16)
    cos, sin = rope_tables(16, 5, 10000.0, rotary_dim=8)
    assert cos.shape == (5, 4)
    cs, sn = cos[None, None], sin[None, None]
    y = apply_rope(x, cs, sn)
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y[..., :8], apply_rope(x[..., :8].contiguous(), cs, sn))
    assert not torch.allclose(y[..., :8], x[..., :8])


# ---- MoE ---------------------------------------------------------------------------------------
def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, straight from the routing rule (MoEConfig's docstring)."""
    c = moe.cfg
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        scores = (moe.router.weight.float() @ x[t].float()).sigmoid()
        biased = scores + moe.router.expert_bias
        size = c.n_experts // c.n_group
        group_score = [sorted(biased[g * size:(g + 1) * size].tolist())[-2:] for g in range(c.n_group)]
        groups = sorted(range(c.n_group), key=lambda g: -sum(group_score[g]))[:c.topk_group]
        allowed = [e for e in range(c.n_experts) if e // size in groups]
        chosen = sorted(allowed, key=lambda e: -biased[e].item())[:c.top_k]
        w = scores[chosen] / scores[chosen].sum() * c.routed_scaling_factor
        for e, we in zip(chosen, w):
            out[t] += we * moe.experts[e](x[t])
        out[t] += moe.shared(x[t])
    return out


def test_moe_grouped_forward_equals_per_token_reference():
    m = randomized(tiny_config(**RICH))
    moe = m.layers[1].mlp
    assert isinstance(moe, MoE) and not isinstance(m.layers[0].mlp, MoE)  # first_k_dense = 1
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        ref = naive_moe(moe, x.reshape(-1, 32)).reshape(2, 13, 32)
        torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moe(x.reshape(-1, 32)), ref.reshape(-1, 32), rtol=1e-5, atol=1e-5)  # packed rows
        assert moe(x[0, :0]).shape == (0, 32)  # a packed batch may have no rows for a layer


def test_moe_softmax_scores_without_groups():
    cfg = MoEConfig(n_experts=4, top_k=1, expert_hidden=8, score_function="softmax", norm_topk_prob=False)
    moe = MoE(16, cfg)
    torch.nn.init.normal_(moe.router.weight)
    x = torch.randn(7, 16)
    with torch.no_grad():
        probs = (x @ moe.router.weight.T).softmax(-1)
        top = probs.argmax(-1)
        ref = torch.stack([probs[t, top[t]] * moe.experts[top[t]](x[t]) for t in range(7)])
        torch.testing.assert_close(moe(x), ref, rtol=1e-5, atol=1e-5)


# ---- every forward path ------------------------------------------------------------------------
class DictKVCache:
    def __init__(self):
        self.k, self.v = {}, {}

    def update(self, layer, k, v):
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], 2), torch.cat([self.v[layer], v], 2)
        self.k[layer], self.v[layer] = k, v
        return k, v


def test_rich_model_block_query_against_kv_cache_matches_whole_forward():
    m = randomized(tiny_config(attention="block", block_size=4, **RICH))
    x = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        ref = m(x)
        cache = DictKVCache()
        pre, q = torch.arange(8), torch.arange(8, 12)
        m(x[:, :8], positions=pre, attn_mask=block_causal_mask(pre, pre, 4), kv_cache=cache)
        out = m(x[:, 8:], positions=q, attn_mask=block_causal_mask(q, torch.arange(12), 4), kv_cache=cache)
    torch.testing.assert_close(out, ref[:, 8:], atol=1e-4, rtol=1e-4)


def test_rich_model_packed_forward_equals_padded():
    m = randomized(tiny_config(attention="block", block_size=4, **RICH))
    L, lengths = 10, [10, 3, 7]
    B = len(lengths)
    ids, pos = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
    real = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        ids[i, L - n:] = torch.randint(3, 40, (n,))
        pos[i, L - n:] = torch.arange(n)
        real[i, L - n:] = True
    mask = block_causal_mask(pos, pos, 4) & real[:, None, :] & real[:, :, None]
    mask[:, :, 0] |= ~real
    with torch.no_grad():
        padded = m(ids, positions=pos, attn_mask=mask)
        packed = m(ids, positions=pos, attn_mask=mask, packed=real.flatten().nonzero().squeeze(1))
    torch.testing.assert_close(packed[real], padded[real], rtol=1e-4, atol=1e-4)


def test_rich_model_bf16_and_backward():
    m = randomized(tiny_config(**RICH))
    x = torch.randint(0, 40, (2, 9))
    m(x).sum().backward()
    assert m.layers[1].mlp.router.weight.grad is not None and m.layers[0].attn.q_norm.weight.grad is not None
    with torch.no_grad():
        out = m.to(torch.bfloat16)(x)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
