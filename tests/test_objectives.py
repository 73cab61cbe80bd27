"""Training objectives: MDLM, block diffusion (BD3-LM) and AR, checked against closed forms,
explicit re-computations and a tiny overfit run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import tiny_config
from unmask.diffusion import (
    Noise, ar_loss, bd3lm_loss, compute_loss, draw_noise, draw_t, get_schedule, mdlm_loss,
)
from unmask.diffusion.masking import token_times
from unmask.model import Transformer

pytestmark = pytest.mark.usefixtures("single_thread")

LINEAR = get_schedule("linear")
COSINE = get_schedule("cosine")
EPS = 1e-3


# ---- helpers ----------------------------------------------------------------------------------

class IIDModel(nn.Module):
    """Ignores its input; predicts the same distribution `logp` (with -inf at [MASK]) everywhere."""

    def __init__(self, logp: torch.Tensor):
        super().__init__()
        self.logp = logp
        self.calls: list[torch.Tensor] = []

    def forward(self, idx, positions=None, attn_mask=None, kv_cache=None, logits_from=0, logits_to=None):
        self.calls.append(idx.clone())
        B, T = idx.shape
        return self.logp.expand(B, T, -1)[:, logits_from:logits_to].clone()


class Perturbed(nn.Module):
    """Wraps a model and adds `delta` to the logits wherever `where(idx_out)` is True."""

    def __init__(self, inner, where, delta=50.0):
        super().__init__()
        self.inner, self.where, self.delta = inner, where, delta

    def forward(self, idx, **kw):
        out = self.inner(idx, **kw)
        lo, hi = kw.get("logits_from", 0), kw.get("logits_to", None)
        sel = self.where(idx[:, lo:hi])
        g = torch.Generator().manual_seed(123)
        noise = self.delta * torch.randn(out.shape, generator=g)
        return torch.where(sel[..., None], out + noise, out)


def iid_setup(V=8, mask_id=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V - 1, generator=g, dtype=torch.float64) * 1.5, 0)
    p = torch.cat([p[:mask_id], torch.zeros(1, dtype=torch.float64), p[mask_id:]])
    logp = p.log().float()  # log 0 = -inf at [MASK]
    H = float(-(p[p > 0] * p[p > 0].log()).sum())
    return p, logp, H


def sample_iid(p, B, L, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(p, B * L, replacement=True, generator=g).view(B, L)


def masked_by(noise: Noise, L, block_size, schedule=LINEAR):
    """Token i is masked when u_i < 1 - α(t_i) (the definition in algorithms.md §1)."""
    t_tok = token_times(noise.t, L, block_size)
    return noise.u < 1.0 - schedule.alpha(t_tok), t_tok


def sub_ce(logits, x0, mask_id):
    """Per-token -log p(x0) with the [MASK] logit removed (SUBS)."""
    logits = logits.clone()
    logits[..., mask_id] = float("-inf")
    return -torch.log_softmax(logits, -1).gather(-1, x0[..., None]).squeeze(-1)


def rel_close(a, b, rel=1e-5):
    a, b = float(a), float(b)
    assert abs(a - b) <= rel * max(abs(a), abs(b), 1e-12), (a, b)


# ---- oracle: iid data, known distribution -----------------------------------------------------

@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_mdlm_oracle(schedule):
    p, logp, H = iid_setup()
    B, L = 4096, 64
    x = sample_iid(p, B, L)
    model = IIDModel(logp)
    noise = draw_noise(B, L, torch.Generator().manual_seed(2))
    out = mdlm_loss(model, x, noise, schedule, mask_id=7)
    # unbiased: the NELBO of iid data under its own distribution is the entropy
    assert abs(float(out.loss) - H) < 0.02 * H, (float(out.loss), H)
    # exact closed form, per sequence: (1/t)·Σ_masked -log p(x_i) / L  (weight -α'/(1-α) in general)
    masked, t_tok = masked_by(noise, L, None, schedule)
    nll = -logp[x]
    per_seq = (schedule.weight(t_tok) * nll * masked).sum(1) / L
    if schedule is LINEAR:
        torch.testing.assert_close(per_seq, (nll * masked).sum(1) / noise.t / L)
    rel_close(out.loss, per_seq.mean())
    rel_close(out.nll, (per_seq * L).sum())
    assert out.tokens == B * L
    for b in range(4):
        one = mdlm_loss(model, x[b:b + 1], noise[b:b + 1], schedule, mask_id=7)
        rel_close(one.loss, per_seq[b])


@pytest.mark.parametrize("block_size,L", [(4, 64), (8, 60)])
def test_bd3lm_oracle(block_size, L):
    p, logp, H = iid_setup()
    B = 4096
    x = sample_iid(p, B, L)
    model = IIDModel(logp)
    noise = draw_noise(B, L, torch.Generator().manual_seed(3), block_size=block_size)
    assert noise.t.shape == (B, math.ceil(L / block_size))
    out = bd3lm_loss(model, x, noise, LINEAR, mask_id=7, block_size=block_size)
    assert abs(float(out.loss) - H) < 0.02 * H, (float(out.loss), H)
    masked, t_tok = masked_by(noise, L, block_size)
    # block j's tokens share t_j
    assert torch.equal(t_tok[:, :block_size], noise.t[:, :1].expand(-1, block_size))
    per_seq = ((-logp[x]) * masked / t_tok).sum(1) / L
    rel_close(out.loss, per_seq.mean())
    rel_close(out.nll, (per_seq * L).sum())
    for b in range(4):
        rel_close(bd3lm_loss(model, x[b:b + 1], noise[b:b + 1], LINEAR, 7, block_size).loss, per_seq[b])


def test_ar_oracle():
    p, logp, H = iid_setup()
    B, L = 1024, 64
    x = sample_iid(p, B, L)
    out = ar_loss(IIDModel(logp), x)
    empirical = (-logp[x[:, 1:]]).mean()
    rel_close(out.loss, empirical)
    rel_close(out.nll, (-logp[x[:, 1:]]).sum())
    assert out.tokens == B * (L - 1)
    assert abs(float(out.loss) - H) < 0.02 * H


# ---- block size 1 at t = 1 is AR --------------------------------------------------------------

@pytest.mark.parametrize("token_shift", [False, True])
def test_block_size_one_at_t1_is_ar_nll(token_shift):
    cfg = tiny_config(attention="block", block_size=1, token_shift=token_shift)
    mask_id = cfg.mask_token_id
    torch.manual_seed(0)
    net = Transformer(cfg).eval()
    B, L = 3, 9
    x = torch.randint(3, cfg.vocab_size, (B, L))
    noise = Noise(t=torch.ones(B, L), u=torch.rand(B, L))
    with torch.no_grad():
        got = bd3lm_loss(net, x, noise, LINEAR, mask_id, block_size=1)
        nll = []
        for i in range(L):
            inp = torch.cat([x[:, :i], torch.full((B, 1), mask_id)], 1)
            logits = net(inp, positions=torch.arange(i + 1))[:, i]
            logits[:, mask_id] = float("-inf")
            nll.append(-torch.log_softmax(logits, -1).gather(1, x[:, i:i + 1]).squeeze(1))
    ar = torch.stack(nll, 1).mean()
    rel_close(got.loss, ar, 1e-5)


# ---- x_t ⊕ x_0 equals block-by-block forwards -------------------------------------------------

@pytest.mark.parametrize("token_shift", [False, True])
@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_bd3lm_concat_equals_blockwise(block_size, token_shift):
    """Training's one forward over x_t ⊕ x_0 sees what inference sees block by block (for token_shift
    models: the previous token is clean before the block and as noised inside it)."""
    cfg = tiny_config(attention="block", block_size=block_size, token_shift=token_shift)
    mask_id = cfg.mask_token_id
    torch.manual_seed(block_size)
    net = Transformer(cfg).eval()
    B, L = 3, 12  # 12 is not a multiple of 8: the last block is partial there
    x0 = torch.randint(3, cfg.vocab_size, (B, L))
    noise = draw_noise(B, L, torch.Generator().manual_seed(5), block_size=block_size)
    masked, t_tok = masked_by(noise, L, block_size)
    assert masked.any() and (~masked).any()
    xt = torch.where(masked, mask_id, x0)
    with torch.no_grad():
        got = bd3lm_loss(net, x0, noise, LINEAR, mask_id, block_size)
        per = torch.zeros(B, L)
        for s in range(0, L, block_size):
            e = min(s + block_size, L)
            inp = torch.cat([x0[:, :s], xt[:, s:e]], 1)
            logits = net(inp)[:, s:e]  # default block-causal mask, positions 0..e-1
            per[:, s:e] = sub_ce(logits, x0[:, s:e], mask_id)
    want = (per * masked / t_tok).sum() / (B * L)
    rel_close(got.loss, want, 1e-5)


# ---- noise drawing ----------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_draw_t_antithetic(n, seed):
    t = draw_t(n, torch.Generator().manual_seed(seed), eps=EPS)
    assert t.shape == (n,)
    assert (t >= EPS).all() and (t <= 1).all()
    s = ((t.double() - EPS) / (1 - EPS)).sort().values
    gaps = torch.cat([s.diff(), (s[:1] + 1 - s[-1:])])  # including the wrap-around
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / n), atol=1e-5, rtol=0)


def test_draw_t_plain_and_determinism():
    t = draw_t(1000, torch.Generator().manual_seed(0), eps=0.1, antithetic=False)
    assert (t >= 0.1).all() and (t <= 1).all()
    assert t.std() > 0.2  # not evenly spaced clones
    a = draw_noise(4, 10, torch.Generator().manual_seed(9), block_size=3)
    b = draw_noise(4, 10, torch.Generator().manual_seed(9), block_size=3)
    assert torch.equal(a.t, b.t) and torch.equal(a.u, b.u)


@pytest.mark.parametrize("block_size,L,n_blocks", [(4, 16, 4), (4, 10, 3), (1, 5, 5), (32, 10, 1)])
def test_per_block_t_shapes(block_size, L, n_blocks):
    noise = draw_noise(6, L, torch.Generator().manual_seed(0), block_size=block_size, eps=EPS)
    assert noise.t.shape == (6, n_blocks)
    assert noise.u.shape == (6, L)
    # antithetic over batch x blocks
    s = ((noise.t.flatten().double() - EPS) / (1 - EPS)).sort().values
    gaps = torch.cat([s.diff(), (s[:1] + 1 - s[-1:])])
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / (6 * n_blocks)), atol=1e-5, rtol=0)
    t_tok = token_times(noise.t, L, block_size)
    assert t_tok.shape == (6, L)
    for i in range(L):
        assert torch.equal(t_tok[:, i], noise.t[:, i // block_size])
    seq = draw_noise(6, L, torch.Generator().manual_seed(0))
    assert seq.t.shape == (6,)


@pytest.mark.parametrize("schedule", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_mask_rate_follows_schedule(schedule):
    V = 8
    model = IIDModel(torch.zeros(V))
    B, L, t = 64, 256, 0.3
    x0 = torch.randint(0, 7, (B, L))
    noise = Noise(torch.full((B,), t), torch.rand(B, L))
    mdlm_loss(model, x0, noise, schedule, mask_id=7)
    frac = float((model.calls[-1] == 7).float().mean())
    want = float(schedule.mask_prob(torch.tensor(t)))
    assert abs(frac - want) < 0.01, (frac, want)


# ---- SUBS and schedules -----------------------------------------------------------------------

def _random_net(attention, **kw):
    torch.manual_seed(0)
    return Transformer(tiny_config(attention=attention, **kw)).eval()


def _loss(objective, model, x0, noise, mask_id=1, block_size=4, prompt_mask=None):
    return compute_loss(objective, model, x0, noise, LINEAR, mask_id, block_size, prompt_mask)


@pytest.mark.parametrize("objective", ["mdlm", "bd3lm"])
def test_subs_ignores_mask_logit(objective):
    net = _random_net("full" if objective == "mdlm" else "block")
    B, L = 4, 12
    x0 = torch.randint(3, 40, (B, L))
    noise = draw_noise(B, L, torch.Generator().manual_seed(1), block_size=4 if objective == "bd3lm" else None)

    class MaskLover(nn.Module):
        def forward(self, idx, **kw):
            out = net(idx, **kw)
            out[..., 1] = 1e30
            return out

    with torch.no_grad():
        base = _loss(objective, net, x0, noise)
        huge = _loss(objective, MaskLover(), x0, noise)
    assert torch.isfinite(huge.loss)
    torch.testing.assert_close(huge.loss, base.loss)


@pytest.mark.parametrize("objective", ["mdlm", "bd3lm"])
def test_clean_positions_carry_no_loss(objective):
    net = _random_net("full" if objective == "mdlm" else "block")
    B, L = 4, 12
    x0 = torch.randint(3, 40, (B, L))
    noise = draw_noise(B, L, torch.Generator().manual_seed(1), block_size=4 if objective == "bd3lm" else None)
    with torch.no_grad():
        base = _loss(objective, net, x0, noise)
        clean = _loss(objective, Perturbed(net, lambda idx: idx != 1), x0, noise)
        noisy = _loss(objective, Perturbed(net, lambda idx: idx == 1), x0, noise)
    assert float(base.loss) > 0
    torch.testing.assert_close(clean.loss, base.loss, rtol=0, atol=0)
    assert abs(float(noisy.loss) - float(base.loss)) > 1e-3  # the perturbation is big enough to matter


def test_linear_schedule():
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    torch.testing.assert_close(LINEAR.weight(t), 1 / t)
    torch.testing.assert_close(LINEAR.mask_prob(t), t)
    h = 1e-6
    num = (LINEAR.alpha(t + h) - LINEAR.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(LINEAR.alpha_prime(t), num)


def test_cosine_schedule():
    t = torch.linspace(0.01, 0.999, 200, dtype=torch.float64)
    w = COSINE.weight(t)
    assert (w > 0).all() and torch.isfinite(w).all()
    h = 1e-6
    num_alpha_prime = (COSINE.alpha(t + h) - COSINE.alpha(t - h)) / (2 * h)
    torch.testing.assert_close(w, -num_alpha_prime / (1 - COSINE.alpha(t)), rtol=1e-6, atol=0)
    assert float(COSINE.alpha(torch.tensor(0.0))) == 1.0  # clean at t=0
    assert abs(float(COSINE.alpha(torch.tensor(1.0)))) < 1e-7  # all masked at t=1
    assert (COSINE.mask_prob(t).diff() > 0).all()


def test_unknown_schedule():
    with pytest.raises(ValueError, match="linear"):
        get_schedule("nope")


# ---- SFT: response-only -----------------------------------------------------------------------

def _sft_batch():
    p, logp, _ = iid_setup()
    B, L = 2, 10
    x0 = sample_iid(p, B, L, seed=4)
    prompt_len = torch.tensor([3, 6])
    prompt = torch.arange(L)[None, :] < prompt_len[:, None]
    return p, logp, x0, prompt


@pytest.mark.parametrize("objective", ["mdlm", "bd3lm"])
@pytest.mark.parametrize("t", [1.0, 0.5, EPS])
def test_sft_prompt_never_masked(objective, t):
    _, logp, x0, prompt = _sft_batch()
    B, L = x0.shape
    model = IIDModel(logp)
    bs = 4 if objective == "bd3lm" else None
    shape = (B,) if bs is None else (B, math.ceil(L / bs))
    for seed in range(5):
        noise = Noise(torch.full(shape, t), torch.rand(B, L, generator=torch.Generator().manual_seed(seed)))
        _loss(objective, model, x0, noise, mask_id=7, prompt_mask=prompt)
        xt = model.calls[-1][:, :L]
        assert torch.equal(xt[prompt], x0[prompt])
        if t == 1.0:
            assert (xt[~prompt] == 7).all()  # the response is fully noised at t = 1


@pytest.mark.parametrize("objective", ["mdlm", "bd3lm", "ar"])
def test_sft_prompt_positions_do_not_matter(objective):
    p, logp, x0, prompt = _sft_batch()
    B, L = x0.shape
    model = IIDModel(logp)
    bs = 4 if objective == "bd3lm" else None
    noise = draw_noise(B, L, torch.Generator().manual_seed(0), block_size=bs)
    base = _loss(objective, model, x0, noise, mask_id=7, prompt_mask=prompt)
    assert float(base.loss) > 0
    # different logits at prompt positions (AR: the positions that predict prompt tokens)
    if objective == "ar":
        pred_prompt = torch.cat([prompt[:, 1:], torch.zeros(B, 1, dtype=torch.bool)], 1)
        where = lambda idx: pred_prompt[:, : idx.shape[1]]  # noqa: E731
    else:
        where = lambda idx: prompt  # noqa: E731
    got = _loss(objective, Perturbed(model, where), x0, noise, mask_id=7, prompt_mask=prompt)
    torch.testing.assert_close(got.loss, base.loss, rtol=0, atol=0)
    # different targets at prompt positions, including the [MASK] id (a prompt may contain it)
    for fill in (5, 7):
        x1 = torch.where(prompt, fill, x0)
        got = _loss(objective, model, x1, noise, mask_id=7, prompt_mask=prompt)
        assert torch.isfinite(got.loss), fill
        torch.testing.assert_close(got.loss, base.loss, rtol=0, atol=0)


@pytest.mark.parametrize("objective", ["mdlm", "bd3lm", "ar"])
def test_sft_normalised_per_response_length(objective):
    _, logp, x0, prompt = _sft_batch()
    B, L = x0.shape
    model = IIDModel(logp)
    nll = -logp[x0]
    if objective == "ar":
        out = ar_loss(model, x0, prompt)
        resp = ~prompt[:, 1:]
        want = ((nll[:, 1:] * resp).sum(1) / resp.sum(1)).mean()
        assert out.tokens == int(resp.sum())
    else:
        bs = 4 if objective == "bd3lm" else None
        shape = (B,) if bs is None else (B, math.ceil(L / bs))
        noise = Noise(torch.ones(shape), torch.rand(B, L))  # t = 1: the whole response is masked, weight 1
        out = _loss(objective, model, x0, noise, mask_id=7, block_size=bs or 4, prompt_mask=prompt)
        resp = ~prompt
        want = ((nll * resp).sum(1) / resp.sum(1)).mean()
        assert out.tokens == int(resp.sum())
    rel_close(out.loss, want)
    # per-response, not per-batch-token normalisation (the rows have different response lengths)
    assert abs(float(want) - float((nll[:, 1:] * resp).sum() / resp.sum() if objective == "ar"
                                   else (nll * resp).sum() / resp.sum())) > 1e-3


def test_sft_gradients_finite_with_mask_token_in_prompt():
    net = _random_net("block")
    B, L = 2, 12
    x0 = torch.randint(3, 40, (B, L))
    prompt = torch.arange(L)[None, :] < torch.tensor([[4], [7]])
    x0[:, 0] = 1  # the [MASK] id inside the prompt
    noise = draw_noise(B, L, torch.Generator().manual_seed(0), block_size=4)
    out = bd3lm_loss(net, x0, noise, LINEAR, 1, 4, prompt)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# ---- a tiny model overfits a tiny corpus ------------------------------------------------------

@pytest.mark.parametrize("objective", ["mdlm", "bd3lm", "ar"])
def test_overfit_tiny_corpus(objective):
    torch.manual_seed(0)
    cfg = tiny_config(objective=objective, d_model=64, n_layers=2, n_heads=4, vocab_size=32, block_size=4)
    net = Transformer(cfg)
    corpus = torch.randint(3, 32, (4, 16), generator=torch.Generator().manual_seed(0))
    bs = 4 if objective == "bd3lm" else None
    rep = 8

    def loss_on(noise, batch):
        return compute_loss(objective, net, batch, noise, LINEAR, cfg.mask_token_id, 4)

    eval_batch = corpus.repeat(16, 1)
    eval_noise = draw_noise(len(eval_batch), 16, torch.Generator().manual_seed(1), block_size=bs)

    def evaluate():
        net.eval()
        with torch.no_grad():
            v = float(loss_on(eval_noise, eval_batch).loss)
        net.train()
        return v

    start = evaluate()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(2)
    batch = corpus.repeat(rep, 1)
    steps = 150 if objective == "ar" else 300
    for _ in range(steps):
        noise = draw_noise(len(batch), 16, g, block_size=bs)
        loss = loss_on(noise, batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    end = evaluate()
    assert end < 0.25 * start, (objective, start, end)
