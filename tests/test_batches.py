"""Training batches: a pure function of (seed, step); FIM rearrangement keeps every token."""
import numpy as np
import torch

from unmask.train.batches import FimSpec, apply_fim, global_batch

P, S, M, E = 3, 4, 5, 0
V3 = FimSpec(P, S, M)  # version 3's layout: no end marker, uniform cuts
TOKENS = np.arange(100, 5100, dtype=np.uint16)


def test_batches_are_a_pure_function_of_seed_and_step():
    a = global_batch(TOKENS, 32, 8, 7, 3, "bd3lm", 4, 1e-3, True)
    b = global_batch(TOKENS, 32, 8, 7, 3, "bd3lm", 4, 1e-3, True)
    c = global_batch(TOKENS, 32, 8, 7, 4, "bd3lm", 4, 1e-3, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].u, b[1].u) and torch.equal(a[1].t, b[1].t)
    assert not torch.equal(a[0], c[0])


def test_fim_off_changes_nothing_and_on_keeps_windows_and_noise():
    base = global_batch(TOKENS, 32, 8, 7, 3, "mdlm", 4, 1e-3, True)
    fim = global_batch(TOKENS, 32, 8, 7, 3, "mdlm", 4, 1e-3, True, fim_rate=1.0, fim=V3)
    assert torch.equal(base[1].u, fim[1].u)  # the noise stream does not move
    for x, y in zip(base[0], fim[0]):
        assert y[0] == P and (y == S).sum() == 1 and (y == M).sum() == 1
        s, m = int((y == S).nonzero()), int((y == M).nonzero())
        prefix, suffix, middle = y[1:s], y[s + 1:m], y[m + 1:]
        assert torch.equal(torch.cat([prefix, middle, suffix]), x[:-3])  # PSM of the same window


def test_fim_rate_is_honoured():
    x = (torch.arange(500 * 64) + 100).view(500, 64)
    out = apply_fim(x, 0.5, np.random.default_rng(0), V3)
    share = float((out[:, 0] == P).float().mean())
    assert 0.42 < share < 0.58
    assert torch.equal(out[out[:, 0] != P], x[out[:, 0] != P])


def psm_parts(y: torch.Tensor, end: int | None):
    s, m = int((y == S).nonzero()), int((y == M).nonzero())
    middle = y[m + 1:]
    if end is not None:
        assert int(middle[-1]) == end
        middle = middle[:-1]
    return y[1:s], y[s + 1:m], middle


def test_fim_end_closes_every_middle_with_eos_and_keeps_the_window():
    x = (torch.arange(200 * 48) % 4000 + 100).view(200, 48)
    out = apply_fim(x, 1.0, np.random.default_rng(1), FimSpec(P, S, M, end_id=E))
    for a, y in zip(x, out):
        assert len(y) == 48 and y[0] == P
        prefix, suffix, middle = psm_parts(y, E)
        assert torch.equal(torch.cat([prefix, middle, suffix]), a[:-4])  # 4 markers, same tokens


def test_line_cuts_take_whole_lines_starting_with_their_newline_token():
    rng = np.random.default_rng(2)
    # token 7 plays a newline(+indent) token: it starts every line
    x = torch.from_numpy(rng.integers(100, 120, size=(300, 64)))
    x[torch.from_numpy(rng.random((300, 64)) < 0.15)] = 7
    starts = np.zeros(200, dtype=bool)
    starts[7] = True
    spec = FimSpec(P, S, M, end_id=E, line_starts=starts, line_rate=1.0, max_lines=2)
    out = apply_fim(x, 1.0, np.random.default_rng(3), spec)
    lines_seen = set()
    for a, y in zip(x, out):
        prefix, suffix, middle = psm_parts(y, E)
        assert torch.equal(torch.cat([prefix, middle, suffix]), a[:-4])
        if (a[1:-4] == 7).sum() < 2:
            continue  # too few lines to cut at: the window was cut uniformly
        assert len(prefix) > 0 and len(middle) > 0 and middle[0] == 7
        assert len(suffix) == 0 or suffix[0] == 7  # the middle stops right before a line start
        lines_seen.add(int((middle == 7).sum()))
    assert lines_seen == {1, 2}


def test_line_rate_mixes_line_and_uniform_cuts():
    x = torch.full((400, 64), 110)
    x[:, ::8] = 7  # a line start every 8 tokens
    starts = np.zeros(200, dtype=bool)
    starts[7] = True
    out = apply_fim(x, 1.0, np.random.default_rng(4), FimSpec(P, S, M, line_starts=starts, line_rate=0.5))
    middles = [psm_parts(y, None)[2] for y in out]
    at_line = [len(m) > 0 and int(m[0]) == 7 for m in middles]
    assert 0.45 < np.mean(at_line) < 0.7  # half by rule, plus uniform cuts that land on a line by chance


def test_version_3_layout_draws_the_same_cuts_as_before():
    """Configs without fim_end or line cuts keep their exact batches (resuming an old run stays exact)."""
    x = (torch.arange(64 * 32) + 100).view(64, 32)
    out = apply_fim(x, 0.5, np.random.default_rng(5), V3)
    rng = np.random.default_rng(5)
    chosen = rng.random(64) < 0.5
    cuts = np.sort(rng.integers(0, 30, size=(64, 2)), axis=1)
    for b in range(64):
        if not chosen[b]:
            assert torch.equal(out[b], x[b])
            continue
        prefix, suffix, middle = psm_parts(out[b], None)
        assert (len(prefix), len(middle)) == (cuts[b, 0], cuts[b, 1] - cuts[b, 0])


def test_spm_puts_the_prefix_right_before_the_middle():
    x = (torch.arange(100 * 40) % 3000 + 100).view(100, 40)
    spec = FimSpec(P, S, M, end_id=E, layout="spm")
    out = apply_fim(x, 1.0, np.random.default_rng(6), spec)
    cuts = []
    for a, y in zip(x, out):
        assert len(y) == 40 and y[0] == S and int(y[-1]) == E and (y == P).sum() == 1 and (y == M).sum() == 0
        p = int((y == P).nonzero())
        suffix, prefix_middle = y[1:p], y[p + 1:-1]
        assert torch.equal(torch.cat([prefix_middle, suffix]), a[:-3])  # 3 markers: suffix, prefix, end
        cuts.append(len(prefix_middle))
    assert len(set(cuts)) > 10  # where the middle ends (the suffix starts) varies
