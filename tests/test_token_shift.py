"""Models with `token_shift` (an embedding of the previous token added to each input): the engine's
cached, ragged forwards must hand the model the same previous tokens a plain forward of the whole
canvas would, so every exactness guarantee of the engine still holds."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import random_pretrained, tiny_config
from test_engine import BLOCK, CACHES, CTX, prompt_ids, random_params, run_loop
from unmask.engine import Engine, SamplingParams
from unmask.model import Transformer
from unmask.sampling import reference_generate

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def models(tok):
    return {a: random_pretrained(tok, a, seed=3, block_size=BLOCK, max_seq_len=CTX, token_shift=True)
            for a in ("block", "full", "causal")}


def test_left_context_reaches_masked_inputs_only():
    cfg = tiny_config(attention="block", token_shift=True)
    torch.manual_seed(0)
    net = Transformer(cfg).eval()
    x = torch.randint(3, cfg.vocab_size, (2, 12))
    x[:, 5:8] = cfg.mask_token_id
    other = dict(prev_idx=torch.full_like(x, 5), prev_gap=torch.ones_like(x))
    with torch.no_grad():
        assert not torch.allclose(net(x), net(x, **other))
        clean = x.clone()
        clean[:, 5:8] = 4
        torch.testing.assert_close(net(clean), net(clean, **other))  # no [MASK]: nothing changes
    assert net.num_params() == Transformer(tiny_config(attention="block")).num_params()


def test_cache_requires_previous_tokens():
    cfg = tiny_config(attention="causal", token_shift=True)
    net = Transformer(cfg)
    with pytest.raises(ValueError, match="prev_idx and prev_gap are required"):
        net(torch.ones(1, 3, dtype=torch.long), attn_mask=torch.ones(1, 3, 3, dtype=torch.bool), kv_cache=object())


@pytest.mark.parametrize("attention", ["block", "full", "causal"])
def test_engine_equals_reference_with_and_without_cache(models, attention):
    model = models[attention]
    engines = {c: Engine(model, cache=c) for c in CACHES[attention]}
    for n in (1, 3, 4, 6, 9):
        prompt = prompt_ids(n, 7 * n)
        sp = SamplingParams(max_tokens=9) if attention == "causal" else SamplingParams(max_tokens=9, steps=9)
        outs = {c: e.generate([prompt], sp)[0].token_ids for c, e in engines.items()}
        ref = reference_generate(model, prompt, **({} if attention == "causal" else dict(steps=9)), max_tokens=9)
        assert outs["none"] == ref.token_ids, n
        if attention != "full":  # the full-attention caches are approximate by design
            assert len(set(map(tuple, outs.values()))) == 1, (n, outs)


@pytest.mark.parametrize("attention,cache", [("block", "exact"), ("causal", "exact"), ("full", "dual")])
def test_batch_invariance(models, attention, cache):
    model = models[attention]
    for mix in range(8):
        rng = random.Random(77 + mix)
        items = [(rng.randint(0, 6), prompt_ids(rng.randint(1, 20), rng.randrange(10**6)),
                  random_params(rng, attention)) for _ in range(rng.randint(2, 5))]
        engine = Engine(model, cache=cache, max_batch=4)
        alone = [engine.generate([p], sp)[0] for _, p, sp in items]
        for a, b in zip(alone, run_loop(engine, items)):
            assert a.token_ids == b.token_ids, mix
            # Lookahead rows ride in free batch slots (engine/lookahead.py): alone, every chance is taken.
            assert a.nfe == b.nfe if not engine.lookahead else a.nfe <= b.nfe, mix


def test_left_context_skips_masks_and_counts_the_distance():
    from unmask.model.shift import MAX_GAP, block_left_context, left_context
    M, P = 1, 2
    prev, gap = left_context(torch.tensor([[5, M, M, 7, M]]), M, P)
    assert prev.tolist() == [[P, 5, 5, 5, 7]] and gap.tolist() == [[1, 1, 2, 3, 1]]
    prev, gap = left_context(torch.full((1, 100), M), M, P)
    assert (prev == P).all() and gap[0, -1] == MAX_GAP
    # block-wise: a block sees its own noised tokens, and the clean stream before it
    x0 = torch.tensor([[10, 11, 12, 13, 14, 15]])
    xt = torch.tensor([[M, 11, M, M, 14, M]])
    prev, gap = block_left_context(xt, x0, M, 3, P)
    assert prev.tolist() == [[P, P, 11, 12, 12, 14]] and gap.tolist() == [[1, 2, 1, 1, 2, 1]]


def test_window_left_context_equals_the_whole_canvas_scan():
    """The runner's per-window scan gives what left_context of the whole canvas gives, for windows
    after a visible token (its Python path), after a mask and at 0 (the tensor path), and with gaps
    past MAX_GAP."""
    import random

    from unmask.engine.runner import window_left_context
    from unmask.model.shift import MAX_GAP, left_context
    M, P = 1, 2
    rnd = random.Random(0)
    for _ in range(300):
        n = rnd.randint(1, 3 * MAX_GAP)
        mask_rate = rnd.choice([0.0, 0.3, 0.9, 1.0])
        canvas = torch.tensor([M if rnd.random() < mask_rate else rnd.randint(3, 50) for _ in range(n)])
        start = rnd.randint(0, n - 1)
        end = rnd.randint(start + 1, n)
        want_prev, want_gap = left_context(canvas[None, :end], M, P)
        prev, gap = window_left_context(canvas, start, end, M, P)
        assert prev.tolist() == want_prev[0, start:].tolist() and gap.tolist() == want_gap[0, start:].tolist()
