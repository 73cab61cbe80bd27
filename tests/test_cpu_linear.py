"""The engine's fp32 CPU linear layer (engine/cpu_linear.py): the same products as F.linear at every
row count and through every kernel (oneDNN-packed or not, padded or not, above the row cap or not),
shared weights, the caller's model untouched, the packed copy skipped for large models, and an engine
that decodes the same tokens with it as without it."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import random_pretrained
from unmask.engine import Engine, SamplingParams
from unmask.engine import cpu_linear
from unmask.engine.cpu_linear import MAX_ROWS, CpuLinear, cpu_linears, padded_rows

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 11, 16, 17, MAX_ROWS, MAX_ROWS + 1])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pack", [False, True])
def test_matches_f_linear(rows, bias, pack):
    torch.manual_seed(rows)
    lin = nn.Linear(48, 80, bias=bias)
    x = torch.randn(rows, 48)
    y = CpuLinear(lin, pack)(x)
    assert y.shape == (rows, 80)
    torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 6])
@pytest.mark.parametrize("pack", [False, True])
def test_column_major_input(rows, pack):
    """The gate * up product of the MLP arrives column-major (the layout of this layer's own output)."""
    lin = nn.Linear(40, 24, bias=False)
    x = torch.randn(40, rows).t()
    assert not x.is_contiguous()
    torch.testing.assert_close(CpuLinear(lin, pack)(x), lin(x), rtol=1e-5, atol=1e-5)


def test_inputs_that_need_gradients_bypass_the_packed_copy():
    lin = nn.Linear(16, 8, bias=False)
    x = torch.randn(6, 16, requires_grad=True)
    y = CpuLinear(lin, pack=True)(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.detach().sum(0).expand(6, 16))


@pytest.mark.parametrize("pack", [False, True])
def test_keeps_leading_dimensions(pack):
    lin = nn.Linear(16, 24, bias=False)
    x = torch.randn(3, 5, 16)
    y = CpuLinear(lin, pack)(x)
    assert y.shape == (3, 5, 24)
    torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
    # The attention layer views its projections as (B, T, heads, head_dim); that must work on the output.
    assert y.view(3, 5, 4, 6).shape == (3, 5, 4, 6)


@pytest.mark.parametrize("m", range(1, 80))
def test_padding_never_drops_rows(m):
    p = padded_rows(m)
    assert p >= max(m, 2)
    assert p - m < 16


def test_shares_weights_and_leaves_the_original(tok):
    model = random_pretrained(tok, "block")
    net = model.net
    wl = cpu_linears(net)
    assert isinstance(wl.lm_head, CpuLinear) and isinstance(wl.layers[0].mlp.up_proj, CpuLinear)
    assert wl.lm_head.packed is not None  # a small model keeps the packed copy
    assert wl.lm_head.weight is net.embed.weight  # still tied, and not copied
    assert wl.layers[1].attn.q_proj.weight is net.layers[1].attn.q_proj.weight
    assert wl.rope_cos is net.rope_cos
    assert isinstance(net.lm_head, nn.Linear) and not isinstance(net.lm_head, CpuLinear)
    for rows in (1, 3, 12):  # oneDNN, (W @ x.T).T, oneDNN
        idx = torch.randint(3, tok.vocab_size, (1, rows))
        with torch.no_grad():
            torch.testing.assert_close(wl(idx), net(idx), rtol=1e-4, atol=1e-4)


def test_no_packed_copy_beyond_the_limit(tok, monkeypatch):
    net = random_pretrained(tok, "block").net
    monkeypatch.setattr(cpu_linear, "PACK_LIMIT_BYTES", cpu_linear.linear_bytes(net) - 1)
    wl = cpu_linears(net)
    assert all(m.packed is None for m in wl.modules() if isinstance(m, CpuLinear))
    idx = torch.randint(3, tok.vocab_size, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(wl(idx), net(idx), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention", ["block", "causal"])
def test_engine_decodes_the_same_tokens_with_and_without_it(tok, attention, monkeypatch):
    model = random_pretrained(tok, attention, block_size=4, max_seq_len=64, peak=4.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(20, 250, (n,), generator=g).tolist() for n in (3, 10, 6)]
    sp = SamplingParams(max_tokens=12, temperature=0.0)
    on = Engine(model)
    assert isinstance(on.net.lm_head, CpuLinear)
    with_it = on.generate(prompts, sp)
    monkeypatch.setattr(cpu_linear, "applies", lambda net: False)
    off = Engine(model)
    assert type(off.net.lm_head) is nn.Linear
    without = off.generate(prompts, sp)
    assert [o.token_ids for o in with_it] == [o.token_ids for o in without]


def test_engine_leaves_other_dtypes_and_quantized_weights_alone(tok):
    from unmask.engine.quantize import Int8WeightOnlyLinear
    model = random_pretrained(tok, "block")
    assert isinstance(Engine(model, quantize="int8wo").net.lm_head, Int8WeightOnlyLinear)
    assert type(Engine(model, quantize="bf16").net.lm_head) is nn.Linear
