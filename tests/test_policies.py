"""Batched decoding policies (sampling.policies) against slow, obvious per-row versions."""
from __future__ import annotations

import math
import random

import pytest
import torch

from unmask.errors import UserError
from unmask.sampling.commit_rule import CommitRule
from unmask.sampling.noise import make_generator, propose, select_topk
from unmask.sampling.policies import (
    FALLBACKS, POLICIES, Proposal, StepParams, propose_batch, select_commits, step_k, validate_fallback,
    validate_policy,
)
from unmask.sampling.schedule import num_transfer_tokens

MASK = 1
NAMES = list(POLICIES)
RULE = CommitRule.init(8, seed=0)  # random weights: the learned policy's mechanics, not its quality


# ---- slow per-row rules: plain Python on lists --------------------------------------------------

def slow_commit(name, conf, margin, entropy, masked, k, thr, fallback="best", learned=None):
    """The set of positions one row commits, straight from the rule's definition."""
    cands = [i for i, m in enumerate(masked) if m]
    if not cands:
        return set()
    picked = slow_rule(name, conf, margin, entropy, cands, k, thr, learned)
    if picked:
        return picked
    if name == "topk" or fallback == "best":
        return {slow_order(name, conf, margin, entropy, cands, learned)[0]}
    return {cands[0]}


def slow_order(name, conf, margin, entropy, cands, learned=None):
    if name == "entropy":
        return sorted(cands, key=lambda i: (entropy[i], i))
    score = margin if name == "margin" else learned if name == "learned" else conf
    return sorted(cands, key=lambda i: (-score[i], i))


def slow_rule(name, conf, margin, entropy, cands, k, thr, learned=None):
    """What the rule itself picks from the masked positions `cands`; may be nothing."""
    order = slow_order(name, conf, margin, entropy, cands, learned)
    if name == "topk":
        return set(order[:min(k, len(cands))])
    if name in ("threshold", "margin", "learned"):
        score = margin if name == "margin" else learned if name == "learned" else conf
        return {i for i in cands if score[i] >= thr}
    if name == "factor":
        n = 0
        for j, i in enumerate(order, start=1):
            if conf[i] >= 1 - thr / (j + 1):
                n = j
            else:
                break
        return set(order[:n])
    if name == "entropy":
        total, n = 0.0, 0
        for i in order:
            if total + entropy[i] <= thr:
                total += entropy[i]
                n += 1
            else:
                break
        return set(order[:n])
    raise AssertionError(name)


def slow_stats(logits_row):
    """Per-position (margin, entropy) of the model's distribution with [MASK] removed, in float64."""
    out = []
    for pos in logits_row.double():
        lg = pos.clone()
        lg[MASK] = float("-inf")
        p = sorted(lg.softmax(-1).tolist(), reverse=True)
        out.append((p[0] - p[1], -sum(q * math.log(q) for q in p if q > 0)))
    return out


def params_for(names, k, thr, temp=None, top_p=None, fallback=None):
    B = len(names)
    return StepParams(
        policy=torch.tensor([POLICIES[n] for n in names], dtype=torch.int64),
        k=torch.tensor(k, dtype=torch.int64),
        threshold=torch.tensor(thr, dtype=torch.float64),
        temperature=torch.tensor(temp if temp is not None else [0.0] * B, dtype=torch.float64),
        top_p=torch.tensor(top_p if top_p is not None else [1.0] * B, dtype=torch.float64),
        fallback=None if fallback is None else torch.tensor([FALLBACKS[f] for f in fallback]),
        rule=RULE,
    )


def random_threshold(name, rnd):
    if name in ("threshold", "margin", "learned"):
        return rnd.choice([1.0, 0.9, 0.5, 0.25, rnd.random() or 1.0])
    if name == "factor":
        return rnd.choice([0.5, 1.0, 2.0, rnd.uniform(0.01, 4)])
    if name == "entropy":
        return rnd.choice([0.1, 0.5, 2.0, rnd.uniform(0.01, 5)])
    return 0.9


def random_masked(rnd, T):
    kind = rnd.choice(["none", "all", "one", "rand", "rand"])
    if kind == "none":
        return [False] * T
    if kind == "all":
        return [True] * T
    if kind == "one":
        m = [False] * T
        m[rnd.randrange(T)] = True
        return m
    return [rnd.random() < 0.5 for _ in range(T)]


# ---- select_commits against the slow rules -------------------------------------------------------

def check_against_slow(prop, masked, names, k, thr, fallback=None):
    params = params_for(names, k, thr, fallback=fallback)
    commit = select_commits(prop, masked, params)
    # Skipping the rankings no row uses changes nothing.
    assert torch.equal(commit, select_commits(prop, masked, params, used={POLICIES[n] for n in names}))
    assert commit.dtype == torch.bool and commit.shape == masked.shape
    assert not (commit & ~masked).any()
    for b, name in enumerate(names):
        one = slice(b, b + 1)  # the learned score of this row alone
        learned = RULE.score(prop.confidence[one], prop.margin[one], prop.entropy[one], masked[one])[0].tolist()
        want = slow_commit(name, prop.confidence[b].tolist(), prop.margin[b].tolist(),
                           prop.entropy[b].tolist(), masked[b].tolist(), k[b], thr[b],
                           "best" if fallback is None else fallback[b], learned)
        got = set(commit[b].nonzero().flatten().tolist())
        assert got == want, (name, b, thr[b], k[b])
        assert (len(got) >= 1) == bool(masked[b].any())


def test_rules_match_slow_with_ties():
    """Synthetic statistics from a small set of values, so ties (in rank and at the cut) are common."""
    rnd = random.Random(1)
    levels = [0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0]
    for _ in range(300):
        B, T = rnd.randint(1, 6), rnd.randint(1, 9)
        conf = torch.tensor([[rnd.choice(levels) for _ in range(T)] for _ in range(B)], dtype=torch.float64)
        margin = torch.tensor([[rnd.choice(levels) for _ in range(T)] for _ in range(B)], dtype=torch.float64)
        entropy = torch.tensor([[rnd.choice(levels) * 2 for _ in range(T)] for _ in range(B)],
                               dtype=torch.float64)
        prop = Proposal(torch.zeros(B, T, dtype=torch.int64), conf, margin, entropy)
        masked = torch.tensor([random_masked(rnd, T) for _ in range(B)])
        names = [rnd.choice(NAMES) for _ in range(B)]
        k = [rnd.randint(0, T + 2) for _ in range(B)]
        thr = [rnd.choice([0.5, 0.9, 1.0, 0.25, 0.1]) if n != "factor" else rnd.choice([0.5, 1.0, 2.0])
               for n in names]
        fallback = rnd.choice([None, [rnd.choice(list(FALLBACKS)) for _ in range(B)]])
        check_against_slow(prop, masked, names, k, thr, fallback)


def test_rules_match_slow_on_model_logits():
    """Statistics from propose_batch on random logits (greedy), including peaked rows."""
    rnd = random.Random(2)
    g = torch.Generator().manual_seed(2)
    for _ in range(150):
        B, T, V = rnd.randint(1, 6), rnd.randint(1, 8), rnd.randint(3, 12)
        scale = torch.tensor([rnd.choice([0.5, 2.0, 8.0]) for _ in range(B)]).view(B, 1, 1)
        logits = torch.randn(B, T, V, generator=g) * scale
        prop = propose_batch(logits, MASK, torch.zeros(B), torch.ones(B), [None] * B)
        masked = torch.tensor([random_masked(rnd, T) for _ in range(B)])
        names = [rnd.choice(NAMES) for _ in range(B)]
        k = [rnd.randint(1, T) for _ in range(B)]
        thr = [random_threshold(n, rnd) for n in names]
        fallback = rnd.choice([None, [rnd.choice(list(FALLBACKS)) for _ in range(B)]])
        check_against_slow(prop, masked, names, k, thr, fallback)


# ---- propose_batch -------------------------------------------------------------------------------

def test_propose_matches_reference_propose_and_stats():
    g = torch.Generator().manual_seed(3)
    B, T, V = 5, 6, 9
    logits = torch.randn(B, T, V, generator=g) * 3
    logits[1, :, 4] = logits[1, :, 5] = 10.0  # exact ties: lowest id wins
    temps = [0.0, 0.0, 0.7, 1.5, 1.0]
    top_ps = [1.0, 0.5, 1.0, 0.8, 0.3]
    seeds = [None, None, 11, 12, 13]
    gens = [make_generator(s, "cpu") if s is not None else None for s in seeds]
    prop = propose_batch(logits, MASK, torch.tensor(temps), torch.tensor(top_ps), gens)
    assert prop.tokens.dtype == torch.int64
    assert prop.confidence.dtype == prop.margin.dtype == prop.entropy.dtype == torch.float64
    assert (prop.tokens[1] == 4).all()
    for b in range(B):
        gen = make_generator(seeds[b], "cpu") if seeds[b] is not None else None
        tok, conf = propose(logits[b], mask_id=MASK, temperature=temps[b], top_p=top_ps[b], generator=gen)
        assert torch.equal(prop.tokens[b], tok)
        assert torch.equal(prop.confidence[b], conf)
        for t, (m, e) in enumerate(slow_stats(logits[b])):
            assert prop.margin[b, t].item() == pytest.approx(m, abs=1e-12)
            assert prop.entropy[b, t].item() == pytest.approx(e, abs=1e-12)


def test_mask_never_proposed():
    g = torch.Generator().manual_seed(4)
    B, T, V = 4, 16, 6
    logits = torch.randn(B, T, V, generator=g)
    logits[..., MASK] = 50.0  # the model loves [MASK]
    gens = [None, make_generator(1, "cpu"), make_generator(2, "cpu"), make_generator(3, "cpu")]
    prop = propose_batch(logits, MASK, torch.tensor([0.0, 1.0, 5.0, 100.0]), torch.tensor([1.0, 1.0, 0.5, 1.0]),
                         gens)
    assert not (prop.tokens == MASK).any()
    assert prop.confidence.max() < 1.0  # [MASK]'s mass is removed, not counted


def test_gumbel_is_float64_of_shape_valid_by_vocab():
    """A sampling row draws exactly one float64 uniform tensor of (valid positions, V) and takes
    argmax(logits / T + Gumbel) on it; padding positions draw nothing."""
    g = torch.Generator().manual_seed(5)
    T, V, n_valid, temp = 7, 10, 4, 0.8
    logits = torch.randn(1, T, V, generator=g)
    valid = torch.zeros(1, T, dtype=torch.bool)
    valid[0, :n_valid] = True
    gen = make_generator(99, "cpu")
    prop = propose_batch(logits, MASK, torch.tensor([temp]), torch.tensor([1.0]), [gen], valid=valid)

    mine = make_generator(99, "cpu")
    u = torch.rand((n_valid, V), generator=mine, dtype=torch.float64)
    lg = logits[0, :n_valid].double()
    lg[:, MASK] = float("-inf")
    want = (lg / temp - torch.log(-torch.log(u))).argmax(-1)
    assert torch.equal(prop.tokens[0, :n_valid], want)
    assert torch.equal(gen.get_state(), mine.get_state())  # same amount drawn, in float64

    wrong = make_generator(99, "cpu")
    torch.rand((n_valid, V), generator=wrong, dtype=torch.float32)
    assert not torch.equal(gen.get_state(), wrong.get_state())  # the check can tell the dtypes apart


# ---- batch invariance ----------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", [False, True])
def test_rows_independent_of_batch(sampling):
    rnd = random.Random(6 + sampling)
    g = torch.Generator().manual_seed(6)
    for _ in range(20):
        B, T, V = rnd.randint(2, 7), rnd.randint(1, 8), rnd.randint(3, 20)
        logits = torch.randn(B, T, V, generator=g) * rnd.choice([1.0, 4.0])
        n_valid = [rnd.randint(1, T) for _ in range(B)]
        valid = torch.tensor([[t < n for t in range(T)] for n in n_valid])
        masked = torch.tensor([random_masked(rnd, T) for _ in range(B)]) & valid
        names = [rnd.choice(NAMES) for _ in range(B)]
        k = [rnd.randint(1, T) for _ in range(B)]
        thr = [random_threshold(n, rnd) for n in names]
        temps = [rnd.choice([0.0, 0.5, 1.0]) if sampling else 0.0 for _ in range(B)]
        top_ps = [rnd.choice([1.0, 0.9, 0.5]) for _ in range(B)]
        seeds = [rnd.randrange(1 << 30) for _ in range(B)]
        params = params_for(names, k, thr, temps, top_ps)

        gens = [make_generator(s, "cpu") for s in seeds]
        prop = propose_batch(logits, MASK, params.temperature, params.top_p, gens, valid=valid)
        commit = select_commits(prop, masked, params)
        for b in range(B):
            one = params_for([names[b]], [k[b]], [thr[b]], [temps[b]], [top_ps[b]])
            p1 = propose_batch(logits[b:b + 1], MASK, one.temperature, one.top_p, [make_generator(seeds[b], "cpu")],
                               valid=valid[b:b + 1])
            c1 = select_commits(p1, masked[b:b + 1], one)
            v = valid[b]
            assert torch.equal(prop.tokens[b, v], p1.tokens[0, v])
            assert torch.equal(prop.confidence[b, v], p1.confidence[0, v])
            assert torch.equal(prop.margin[b, v], p1.margin[0, v])
            assert torch.equal(prop.entropy[b, v], p1.entropy[0, v])
            assert torch.equal(commit[b], c1[0])


# ---- topk + step_k reproduce the reference schedule ----------------------------------------------

def test_step_k_matches_num_transfer_tokens():
    ns, ss, idx, want = [], [], [], []
    for n in range(0, 41):
        for s in range(1, 46):
            sched = num_transfer_tokens(n, s)
            for i in range(len(sched) + 2):
                ns.append(n), ss.append(s), idx.append(i)
                want.append(sched[i] if i < len(sched) else 0)
    got = step_k(torch.tensor(ns), torch.tensor(ss), torch.tensor(idx))
    assert got.dtype == torch.int64
    assert got.tolist() == want


def test_topk_with_step_k_reproduces_reference_block():
    """A batch of blocks of different lengths, greedy and seeded, step by step: the batched policy
    commits the same positions and tokens as the reference's propose + select_topk on each block."""
    rnd = random.Random(7)
    g = torch.Generator().manual_seed(7)
    T, V = 8, 13
    for _ in range(6):
        B = 5
        n = [rnd.randint(1, T) for _ in range(B)]
        steps = [rnd.randint(1, T + 2) for _ in range(B)]
        temps = [rnd.choice([0.0, 0.9]) for _ in range(B)]
        seeds = [rnd.randrange(1 << 30) for _ in range(B)]
        valid = torch.tensor([[t < nb for t in range(T)] for nb in n])
        n_steps = [len(num_transfer_tokens(nb, s)) for nb, s in zip(n, steps)]

        ref_canvas = [torch.full((nb,), MASK) for nb in n]
        ref_gens = [make_generator(s, "cpu") for s in seeds]
        canvas = torch.full((B, T), MASK)
        gens = [make_generator(s, "cpu") for s in seeds]
        for i in range(max(n_steps)):
            logits = torch.randn(B, T, V, generator=g) * 2
            logits[..., 3] = logits[..., 4]  # some exact ties in token choice
            active = torch.tensor([i < ns for ns in n_steps])
            masked = (canvas == MASK) & valid & active.view(B, 1)
            params = params_for(["topk"] * B, [0] * B, [0.9] * B, temps, [1.0] * B)
            params.k = step_k(torch.tensor(n), torch.tensor(steps), torch.full((B,), i))
            # the engine calls the sampler only for rows still in their block
            rows = [b for b in range(B) if active[b]]
            prop = propose_batch(logits[rows], MASK, params.temperature[rows], params.top_p[rows],
                                 [gens[b] for b in rows], valid=valid[rows])
            sub = StepParams(params.policy[rows], params.k[rows], params.threshold[rows],
                             params.temperature[rows], params.top_p[rows])
            commit = select_commits(prop, masked[rows], sub)
            for j, b in enumerate(rows):
                canvas[b][commit[j]] = prop.tokens[j][commit[j]]
                k = num_transfer_tokens(n[b], steps[b])[i]
                tok, conf = propose(logits[b, :n[b]], mask_id=MASK, temperature=temps[b], top_p=1.0,
                                    generator=ref_gens[b])
                chosen = select_topk(conf, ref_canvas[b] == MASK, k)
                ref_canvas[b][chosen] = tok[chosen]
                assert torch.equal(canvas[b, :n[b]], ref_canvas[b]), (b, i)
        assert not (canvas[valid] == MASK).any()


# ---- threshold behaviour -------------------------------------------------------------------------

def run_block(logits_fn, name, thr, T=8):
    """Decode one all-masked block greedily with one policy; the number of tokens per step."""
    canvas = torch.full((1, T), MASK)
    per_step = []
    while (canvas == MASK).any():
        prop = propose_batch(logits_fn(), MASK, torch.zeros(1), torch.ones(1), [None])
        commit = select_commits(prop, canvas == MASK, params_for([name], [1], [thr]))
        per_step.append(int(commit.sum()))
        canvas[commit] = prop.tokens[commit]
        assert len(per_step) <= T
    return per_step


def test_threshold_one_commits_one_per_step():
    g = torch.Generator().manual_seed(8)
    per_step = run_block(lambda: torch.randn(1, 8, 10, generator=g) * 3, "threshold", 1.0)
    assert per_step == [1] * 8


def test_threshold_commits_several_when_confident():
    g = torch.Generator().manual_seed(9)

    def peaked():
        lg = torch.randn(1, 8, 10, generator=g)
        lg[0, :5, 7] += 12.0  # five positions the model is sure of (p > 0.99)
        return lg

    per_step = run_block(peaked, "threshold", 0.9)
    assert per_step[0] == 5 and sum(per_step) == 8


def test_leftmost_fallback_decodes_left_to_right_when_unsure():
    """Threshold 1.0 passes nothing (p < 1 everywhere): the leftmost fallback then writes the block in
    position order, one per step, whatever the confidences; "best" follows the confidences."""
    g = torch.Generator().manual_seed(10)
    T = 8
    for fallback, want_order in (("leftmost", list(range(T))), ("best", None)):
        canvas = torch.full((1, T), MASK)
        order = []
        while (canvas == MASK).any():
            prop = propose_batch(torch.randn(1, T, 10, generator=g) * 3, MASK, torch.zeros(1), torch.ones(1), [None])
            commit = select_commits(prop, canvas == MASK, params_for(["threshold"], [1], [1.0], fallback=[fallback]))
            assert int(commit.sum()) == 1
            pos = int(commit[0].nonzero()[0])
            if fallback == "best":
                masked_conf = prop.confidence[0].masked_fill(canvas[0] != MASK, -1.0)
                assert pos == int(masked_conf.argmax())
            order.append(pos)
            canvas[commit] = prop.tokens[commit]
        if want_order is not None:
            assert order == want_order


def test_fallback_leaves_confident_steps_and_topk_alone():
    g = torch.Generator().manual_seed(11)
    B, T = 6, 8
    logits = torch.randn(B, T, 10, generator=g)
    logits[:, 5:, 7] += 12.0  # positions 5..7 pass tau = 0.9 in every row
    prop = propose_batch(logits, MASK, torch.zeros(B), torch.ones(B), [None] * B)
    masked = torch.ones(B, T, dtype=torch.bool)
    names = ["threshold", "factor", "margin", "topk", "topk", "entropy"]
    k, thr = [1, 1, 1, 2, 0, 1], [0.9, 1.0, 0.9, 0.9, 0.9, 0.05]
    best = select_commits(prop, masked, params_for(names, k, thr, fallback=["best"] * B))
    left = select_commits(prop, masked, params_for(names, k, thr, fallback=["leftmost"] * B))
    assert torch.equal(best, left)
    assert torch.equal(best, select_commits(prop, masked, params_for(names, k, thr)))
    assert best[0].nonzero().flatten().tolist() == [5, 6, 7]


# ---- validation ----------------------------------------------------------------------------------

def test_validate_fallback():
    for name in FALLBACKS:
        validate_fallback(name)
    with pytest.raises(UserError, match="unknown fallback 'left'; choose one of: best, leftmost"):
        validate_fallback("left")


@pytest.mark.parametrize("name,thr", [("topk", None), ("topk", 5.0), ("threshold", 0.9), ("threshold", 1.0),
                                      ("margin", 0.1), ("factor", 3.0), ("entropy", 0.1), ("entropy", None)])
def test_validate_accepts(name, thr):
    validate_policy(name, thr)


@pytest.mark.parametrize("name,thr,words", [
    ("bogus", 0.9, ["unknown policy 'bogus'", "topk, threshold, factor, entropy, margin"]),
    ("threshold", 0.0, ["(0, 1]", "threshold policy", "got 0.0"]),
    ("threshold", 1.5, ["(0, 1]", "got 1.5"]),
    ("margin", float("nan"), ["(0, 1]", "margin policy"]),
    ("margin", -0.2, ["(0, 1]", "margin policy"]),
    ("factor", 0.0, ["factor f > 0", "got 0.0"]),
    ("factor", float("inf"), ["factor f > 0"]),
    ("entropy", -1.0, ["gamma > 0", "got -1.0"]),
    ("entropy", 0.0, ["gamma > 0"]),
])
def test_validate_rejects(name, thr, words):
    with pytest.raises(UserError) as e:
        validate_policy(name, thr)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg
