"""EMA, FLOP accounting and the FlexAttention mask: the pieces the trainer applies from outside the model."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from unmask.diffusion.losses import bd3_attention_mask, bd3_block_mask
from unmask.model import Transformer
from unmask.train.ema import EMA
from unmask.train.flops import flops_per_token, peak_flops


def test_ema_tracks_the_weights_with_warmup_and_swaps_back():
    net = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA(net, decay=0.9)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema.update(net, step=0)  # warm-up decay (1 + 0) / (10 + 0) = 0.1
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 0.9))
    ema.update(net, step=1000)  # now the configured 0.9
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 0.91))  # 0.9 * 0.9 + 0.1 * 1
    with ema.swapped_in(net):
        assert torch.allclose(net.weight, torch.full((2, 3), 0.91))
    assert torch.equal(net.weight, torch.ones(2, 3))

    other = EMA(net, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])


def test_block_diffusion_costs_about_twice_ar_per_token():
    ar, bd = tiny_config(objective="ar"), tiny_config(objective="bd3lm")
    n = 10_000
    f_ar, f_bd = flops_per_token(ar, n, 64), flops_per_token(bd, n, 64)
    assert f_ar == 6 * n + 12 * ar.n_layers * ar.d_model * 32
    assert f_bd == pytest.approx(2 * (6 * n + 12 * bd.n_layers * bd.d_model * 64))
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2.0) == 2e12


@pytest.mark.filterwarnings("ignore:.*flex_attention.*")
def test_flex_block_mask_matches_the_dense_bd3_mask():
    pytest.importorskip("torch.nn.attention.flex_attention")
    cfg = tiny_config(objective="bd3lm", block_size=4, max_seq_len=64)
    net = Transformer(cfg).eval()
    L = 16
    x = torch.randint(3, cfg.vocab_size, (2, 2 * L))
    pos = torch.arange(L).repeat(2)
    allowed = bd3_attention_mask(L, cfg.block_size)
    additive = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    with torch.no_grad():  # FlexAttention has no CPU backward; the forward is what must agree
        dense = net(x, positions=pos, attn_mask=allowed)
        add = net(x, positions=pos, attn_mask=additive)
        flex = net(x, positions=pos, attn_mask=bd3_block_mask(L, cfg.block_size, "cpu"))
    assert torch.allclose(dense, add, atol=1e-5)
    assert torch.allclose(dense, flex, atol=1e-4)


def test_ema_without_saved_state_is_a_clear_error(tmp_path):
    from unmask.errors import UserError
    from unmask.train.checkpoint import load_checkpoint, save_checkpoint

    net = Transformer(tiny_config(objective="ar"))
    opt = torch.optim.AdamW(net.parameters())
    ck = save_checkpoint(tmp_path, 1, net, opt, {})
    with pytest.raises(UserError, match="no EMA state"):
        load_checkpoint(ck, net, opt, EMA(net, 0.9))
