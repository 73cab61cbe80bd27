"""Block lookahead (engine/lookahead.py): a block's last step also runs the next block's first step on
the drafted token. The tokens must be exactly those of the engine without it; only forwards are saved,
and only when the guess held. Tiny models, one thread."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import random_pretrained
from test_engine import bias_eos, prompt_ids, run_loop
from unmask.engine import Engine, SamplingParams
from unmask.engine.request import Window
from unmask.sampling import block_spans

BLOCK = 4
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here runs on one intra-op thread (the machine is shared)."""


@pytest.fixture(scope="module")
def models(tok):
    kw = dict(block_size=BLOCK, max_seq_len=96)
    return {"block": random_pretrained(tok, "block", **kw),
            "shift": random_pretrained(tok, "block", seed=1, token_shift=True, **kw),
            "sharp": random_pretrained(tok, "block", seed=2, token_shift=True, peak=6.0, **kw)}


@pytest.fixture
def fresh(tok):
    """A new model per test, for tests that rewrite its forward (bias_eos)."""
    return lambda seed=1, peak=1.0: random_pretrained(tok, "block", seed=seed, peak=peak, block_size=BLOCK,
                                                      max_seq_len=96)


def greedy(rng: random.Random) -> SamplingParams:
    policy = rng.choice(["topk", "threshold", "factor", "entropy", "margin"])
    mt = rng.randint(3, 30)
    kw = {"steps": rng.randint(max(1, mt // 3), mt)} if policy == "topk" else \
        {"threshold": rng.choice([0.3, 0.6, 0.9, 1.0]) if policy in ("threshold", "margin") else rng.choice([0.5, 1.0, 2.0]),
         "fallback": rng.choice(["best", "leftmost"])}
    return SamplingParams(max_tokens=mt, policy=policy, temperature=0.0, **kw)


def count_calls(engine: Engine) -> list[list[Window]]:
    calls = []
    orig = engine.runner.forward

    def forward(canvases, windows, tables, scratch=None):
        calls.append(list(windows))
        return orig(canvases, windows, tables, scratch)

    engine.runner.forward = forward
    return calls


@pytest.mark.parametrize("name", ["block", "shift", "sharp"])
def test_same_tokens_and_one_forward_fewer_per_hit(models, name):
    """Alone, request by request: the tokens, text and finish reason equal the engine without
    lookahead, and the NFE is lower by exactly the number of guesses that held."""
    model = models[name]
    on, off = Engine(model, max_batch=1), Engine(model, max_batch=1, lookahead=False)
    rng = random.Random(name)
    for case in range(40):
        prompt, sp = prompt_ids(rng.randint(1, 20), rng.randrange(10**6)), greedy(rng)
        hits = on.lookahead_hits
        a, b = on.generate([prompt], sp)[0], off.generate([prompt], sp)[0]
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason), (case, sp)
        assert a.nfe == b.nfe - (on.lookahead_hits - hits), (case, sp)
    # Both outcomes happened: guesses that held, and guesses that were thrown away.
    assert 0 < on.lookahead_hits < on.lookahead_rows
    assert off.lookahead_rows == 0


@pytest.mark.parametrize("gate", [0.0, 0.2])
def test_a_gate_looks_ahead_from_several_open_positions(models, gate):
    """With a gate, a step whose block still has several open positions also looks ahead when the
    previous forward was sure enough of every draft: the same tokens, more rows, at least as many hits."""
    model = models["sharp"]
    gated = Engine(model, max_batch=1, lookahead_gate=gate)
    one, off = Engine(model, max_batch=1), Engine(model, max_batch=1, lookahead=False)
    rng = random.Random(gate)
    for case in range(30):
        prompt = prompt_ids(rng.randint(1, 20), rng.randrange(10**6))
        sp = SamplingParams(max_tokens=rng.randint(8, 30), temperature=0.0, policy="threshold",
                            threshold=rng.choice([0.6, 0.9]))
        hits = gated.lookahead_hits
        a, b, c = gated.generate([prompt], sp)[0], off.generate([prompt], sp)[0], one.generate([prompt], sp)[0]
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason), (case, sp)
        assert a.nfe == b.nfe - (gated.lookahead_hits - hits) and a.nfe <= c.nfe, case
    assert gated.lookahead_rows > one.lookahead_rows and gated.lookahead_hits >= one.lookahead_hits
    with pytest.raises(Exception, match="lookahead_gate must be in"):
        Engine(model, lookahead_gate=1.5)


def test_the_row_is_the_next_block_start_and_replaces_it(fresh):
    """A lookahead row is the window the next block's start would have run; after a hit the next
    forward for that request is already a continuation of the new block (one block wide)."""
    model = fresh()
    bias_eos(model)
    engine = Engine(model, max_batch=1)
    calls = count_calls(engine)
    out = engine.generate([prompt_ids(6, 3)], SamplingParams(max_tokens=24, policy="topk", steps=24))[0]
    assert out.completion_tokens == 24 and engine.lookahead_hits > 0
    # topk, one token per step: every block but the first (prefilled with the prompt) begins with a
    # block start spanning two blocks, unless a lookahead row ran it.
    starts = sum(windows[0].end - windows[0].start > BLOCK for windows in calls[1:])
    assert starts == len(block_spans(6, 30, BLOCK)) - 1 - engine.lookahead_hits
    assert out.nfe == 24 - engine.lookahead_hits


def test_sampling_requests_never_look_ahead(models):
    """A sampling row's noise must not depend on rows that may be thrown away: no lookahead for it,
    and a seeded request gives the same tokens and NFE either way, also batched with greedy ones."""
    model = models["shift"]
    on, off = Engine(model, max_batch=8), Engine(model, max_batch=8, lookahead=False)
    items = [(k, prompt_ids(3 + k, k), SamplingParams(max_tokens=17, temperature=1.0, seed=k, policy="threshold",
                                                     threshold=0.5, fallback="leftmost")) for k in range(3)]
    items.append((1, prompt_ids(5, 9), SamplingParams(max_tokens=17, temperature=0.0, policy="topk", steps=17)))
    a, b = run_loop(on, items), run_loop(off, items)
    for x, y in zip(a[:3], b[:3]):
        assert (x.token_ids, x.nfe) == (y.token_ids, y.nfe)
    assert a[3].token_ids == b[3].token_ids and a[3].nfe < b[3].nfe
    alone = Engine(model, max_batch=4)
    for _, p, sp in items[:3]:
        alone.generate([p], sp)
    assert alone.lookahead_rows == 0


def test_rows_ride_in_free_batch_slots_only(fresh):
    """A full batch carries no lookahead rows; a batch-1 engine has room for one."""
    model = fresh()
    bias_eos(model)
    for max_batch, rows in ((1, 2), (3, 3), (4, 4)):
        engine = Engine(model, max_batch=max_batch)
        calls = count_calls(engine)
        outs = engine.generate([prompt_ids(4, s) for s in range(3)],
                               SamplingParams(max_tokens=20, policy="topk", steps=20))
        assert all(o.completion_tokens == 20 for o in outs)
        assert max(len(w) for w in calls) == rows
        assert (engine.lookahead_rows > 0) == (max_batch != 3)  # three requests fill three slots


def test_eos_in_the_draft_or_the_last_block_runs_nothing_ahead(fresh):
    model = fresh(seed=2, peak=6.0)
    bias_eos(model, force_at=9 + 5)  # prompt of 9: EOS certain at generated index 5 (block [12, 16))
    engine = Engine(model, max_batch=1)
    calls = count_calls(engine)
    out = engine.generate([prompt_ids(9, 1)], SamplingParams(max_tokens=20, policy="topk", steps=20))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 5
    assert all(w.end <= 16 for windows in calls for w in windows)  # nothing beyond the block holding EOS
    off = Engine(model, max_batch=1, lookahead=False).generate([prompt_ids(9, 1)], SamplingParams(
        max_tokens=20, policy="topk", steps=20))[0]
    assert (out.token_ids, out.nfe) == (off.token_ids, off.nfe - engine.lookahead_hits)
    # max_tokens ends inside a block: the last block never looks past the generated region.
    bias_eos(model)
    calls.clear()
    out = engine.generate([prompt_ids(2, 2)], SamplingParams(max_tokens=11, policy="topk", steps=11))[0]
    assert out.finish_reason == "length" and max(w.end for windows in calls for w in windows) == 13


def test_pages_are_lent_and_returned_and_a_short_pool_still_serves(models):
    """The ordinary row of a lookahead step writes to a page lent for that step only. With a KV budget
    too small to lend one, steps run without lookahead and the tokens do not change."""
    model = models["shift"]
    rng = random.Random(5)
    items = [(rng.randint(0, 4), prompt_ids(rng.randint(1, 12), k), greedy(rng)) for k in range(6)]
    want = [o.token_ids for o in run_loop(Engine(model, max_batch=3, lookahead=False), items)]
    for budget in (None, 48, 40):
        engine = Engine(model, max_batch=3, kv_budget_tokens=budget)
        free0 = engine.cache.free_pages
        assert [o.token_ids for o in run_loop(engine, items)] == want, budget
        assert engine.cache.free_pages == free0 and engine.lookahead_rows > 0


def test_bucketed_steps_with_lookahead_rows(models):
    """The static-shape path (Engine(cuda_graphs=True), eager on CPU) pads lookahead rows like any
    other: batch buckets count them, and the tokens are the plain engine's."""
    model = models["shift"]
    prompts = [prompt_ids(n, n) for n in (3, 9, 14)]
    sps = [SamplingParams(max_tokens=mt, policy="topk", steps=mt, temperature=0.0) for mt in (12, 7, 16)]
    want = Engine(model, max_batch=4, lookahead=False).generate(prompts, sps)
    engine = Engine(model, max_batch=4, cuda_graphs=True)
    got = engine.generate(prompts, sps)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert engine.lookahead_rows > 0 and engine.runner.graphs.eager > 0


def test_a_scratch_window_must_fit_one_page(models):
    engine = Engine(models["block"], max_batch=1)
    canvas = torch.tensor(prompt_ids(12))
    table = [1, 2, 3]
    with pytest.raises(ValueError, match="does not fit 1 page"):
        engine.runner.forward([canvas], [Window(0, 8, 8, 4, 8)], [table], scratch=[4])


def test_off_for_models_and_caches_it_does_not_apply_to(tok):
    kw = dict(block_size=BLOCK, max_seq_len=64)
    assert not Engine(random_pretrained(tok, "causal", **kw)).lookahead
    assert not Engine(random_pretrained(tok, "full", **kw)).lookahead
    assert not Engine(random_pretrained(tok, "block", **kw), cache="none").lookahead
    assert Engine(random_pretrained(tok, "block", **kw)).lookahead
