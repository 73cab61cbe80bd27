"""The 'count' NELBO estimator: exactly k of a block's n tokens masked, k uniform, weight n/k.

It must estimate the same bound as the continuous-time one ('time') with a lower variance, and
derive everything from the same noise draws."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from test_objectives import IIDModel, iid_setup, sample_iid
from unmask.diffusion import Noise, bd3lm_loss, compute_loss, draw_noise, get_schedule, mdlm_loss
from unmask.diffusion.losses import _count_masks
from unmask.model import Transformer

pytestmark = pytest.mark.usefixtures("single_thread")

LINEAR = get_schedule("linear")
EPS = 1e-3


@pytest.mark.parametrize("block_size,L", [(None, 64), (4, 64), (8, 60), (1, 9)])
def test_structure(block_size, L):
    B = 64
    noise = draw_noise(B, L, torch.Generator().manual_seed(0), block_size=block_size, eps=EPS)
    masked, w = _count_masks(noise, L, block_size, None, EPS)
    bs = block_size or L
    t = noise.t if noise.t.dim() == 2 else noise.t[:, None]
    for j in range(t.shape[1]):
        lo, hi = j * bs, min((j + 1) * bs, L)
        n = hi - lo
        k = torch.clamp(torch.floor((t[:, j] - EPS) / (1 - EPS) * n).long() + 1, max=n)
        assert torch.equal(masked[:, lo:hi].sum(1), k)
        # the masked tokens are the ones with the smallest uniforms of their block
        u = noise.u[:, lo:hi]
        kth = u.sort(1).values.gather(1, (k - 1)[:, None])
        assert torch.equal(masked[:, lo:hi], u <= kth)
        torch.testing.assert_close(w[:, lo:hi], (n / k).float()[:, None].expand(-1, n))


def test_counts_are_uniform_and_stratified():
    # antithetic t over batch x blocks gives every count 1..n equally often
    noise = draw_noise(16, 64, torch.Generator().manual_seed(1), block_size=16, eps=EPS)
    masked, _ = _count_masks(noise, 64, 16, None, EPS)
    k = masked.view(16, 4, 16).sum(-1).flatten()
    assert torch.equal(torch.bincount(k, minlength=17)[1:], torch.full((16,), 4))


def test_prompt_tokens_are_never_masked_and_not_counted():
    L, bs = 12, 4
    noise = draw_noise(256, L, torch.Generator().manual_seed(2), block_size=bs, eps=EPS)
    prompt = torch.zeros(256, L, dtype=torch.bool)
    prompt[:, :6] = True  # block 0 is all prompt, block 1 half
    masked, w = _count_masks(noise, L, bs, prompt, EPS)
    assert not (masked & prompt).any()
    assert masked[:, 4:8].sum(1).max() == 2 and masked[:, 4:8].sum(1).min() == 1
    assert set(w[:, 6][masked[:, 6]].tolist()) <= {2.0, 1.0}
    assert masked[:, 8:].sum(1).min() >= 1


@pytest.mark.parametrize("objective,block_size,L,gain", [("mdlm", None, 64, 1.5), ("bd3lm", 4, 64, 2),
                                                          ("bd3lm", 8, 60, 2)])
def test_iid_oracle_and_lower_variance(objective, block_size, L, gain):
    """On iid data under its own distribution the bound is the entropy; the count estimator hits it
    with a far smaller spread than the time estimator on the same draws."""
    p, logp, H = iid_setup()
    model = IIDModel(logp)
    g = torch.Generator().manual_seed(3)
    x = sample_iid(p, 512, L)
    vals = {"time": [], "count": []}
    for _ in range(40):
        noise = draw_noise(16, L, g, block_size=block_size, eps=EPS)
        for est in vals:
            out = compute_loss(objective, model, x[:16], noise, LINEAR, 7, block_size or 1, estimator=est, eps=EPS)
            vals[est].append(float(out.loss))
    big = compute_loss(objective, model, x, draw_noise(512, L, g, block_size=block_size, eps=EPS),
                       LINEAR, 7, block_size or 1, estimator="count", eps=EPS)
    assert abs(float(big.loss) - H) < 0.01 * H, (float(big.loss), H)
    assert np.std(vals["count"]) < np.std(vals["time"]) / gain, (np.std(vals["count"]), np.std(vals["time"]))


def test_same_expectation_as_continuous_time_on_a_real_model():
    """Enumerate every masked subset of one 4-token sequence under a random transformer. The
    continuous-time NELBO, integrated numerically over t, must equal the count estimator's exact
    expectation, and each count draw must return (n/k) * its subset's loss."""
    n, mask_id = 4, 1
    torch.manual_seed(0)
    net = Transformer(tiny_config(attention="full", objective="mdlm")).eval()
    x0 = torch.tensor([[5, 9, 3, 12]])
    subset_loss = {}
    for S in itertools.product([False, True], repeat=n):
        m = torch.tensor([S])
        if not m.any():
            continue
        # a t that draws exactly k = |S| tokens, and uniforms that pick S as the k smallest
        k = int(m.sum())
        t = torch.tensor([EPS + (1 - EPS) * (k - 0.5) / n])
        u = torch.where(m, 0.1, 0.9)[0][None].float()
        with torch.no_grad():
            out = mdlm_loss(net, x0, Noise(t, u), LINEAR, mask_id, estimator="count", eps=EPS)
            logits = net(torch.where(m, mask_id, x0))
        logits[..., mask_id] = float("-inf")
        ce = -torch.log_softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)
        subset_loss[S] = float(ce[m].sum())
        assert math.isclose(float(out.loss), n / k * subset_loss[S] / n, rel_tol=1e-5)
    ts = np.linspace(0, 1, 200_001)[1:]
    integrand = sum(ts ** (sum(S) - 1) * (1 - ts) ** (n - sum(S)) * v for S, v in subset_loss.items())
    time_nelbo = np.trapezoid(integrand, ts) / n
    count_nelbo = sum(v * (n / sum(S)) / math.comb(n, sum(S)) / n for S, v in subset_loss.items()) / n
    assert math.isclose(time_nelbo, count_nelbo, rel_tol=1e-4), (time_nelbo, count_nelbo)


def test_bd3lm_count_runs_backward_on_transformer():
    torch.manual_seed(0)
    net = Transformer(tiny_config(attention="block", objective="bd3lm", block_size=4))
    x0 = torch.randint(3, 40, (2, 16))
    noise = draw_noise(2, 16, torch.Generator().manual_seed(0), block_size=4, eps=EPS)
    out = bd3lm_loss(net, x0, noise, LINEAR, 1, 4, estimator="count", eps=EPS)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_unknown_estimator():
    noise = draw_noise(1, 8, torch.Generator().manual_seed(0), eps=EPS)
    with pytest.raises(ValueError, match="unknown estimator 'bogus'"):
        mdlm_loss(IIDModel(torch.zeros(8)), torch.zeros(1, 8, dtype=torch.long), noise, LINEAR, 7,
                  estimator="bogus")
