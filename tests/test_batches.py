"""Training batches: a pure function of (seed, step); FIM rearrangement keeps every token."""
import numpy as np
import torch

from unmask.train.batches import apply_fim, global_batch

P, S, M = 3, 4, 5
TOKENS = np.arange(100, 5100, dtype=np.uint16)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = global_batch(TOKENS, 32, 8, 7, 3, "bd3lm", 4, 1e-3, True)
    b = global_batch(TOKENS, 32, 8, 7, 3, "bd3lm", 4, 1e-3, True)
    c = global_batch(TOKENS, 32, 8, 7, 4, "bd3lm", 4, 1e-3, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].u, b[1].u) and torch.equal(a[1].t, b[1].t)
    assert not torch.equal(a[0], c[0])


def test_fim_off_changes_nothing_and_on_keeps_windows_and_noise():
    base = global_batch(TOKENS, 32, 8, 7, 3, "mdlm", 4, 1e-3, True)
    fim = global_batch(TOKENS, 32, 8, 7, 3, "mdlm", 4, 1e-3, True, fim_rate=1.0, fim_ids=(P, S, M))
    assert torch.equal(base[1].u, fim[1].u)  # the noise stream does not move
    for x, y in zip(base[0], fim[0]):
        assert y[0] == P and (y == S).sum() == 1 and (y == M).sum() == 1
        s, m = int((y == S).nonzero()), int((y == M).nonzero())
        prefix, suffix, middle = y[1:s], y[s + 1:m], y[m + 1:]
        assert torch.equal(torch.cat([prefix, middle, suffix]), x[:-3])  # PSM of the same window


def test_fim_rate_is_honoured():
    x = (torch.arange(500 * 64) + 100).view(500, 64)
    out = apply_fim(x, 0.5, np.random.default_rng(0), P, S, M)
    share = float((out[:, 0] == P).float().mean())
    assert 0.42 < share < 0.58
    assert torch.equal(out[out[:, 0] != P], x[out[:, 0] != P])
