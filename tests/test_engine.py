"""The inference engine (unmask.Engine): equivalence with the reference sampler, batch invariance,
the exact and approximate KV caches, the scheduler's KV budget, stopping, streaming, errors and
NFE accounting. Tiny models, one thread: the whole module runs in well under a minute."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import random_pretrained
from unmask.engine import Engine, SamplingParams
from unmask.errors import UserError
from unmask.pretrained import Pretrained
from unmask.sampling import reference_generate
from unmask.tokenizer import Tokenizer

CACHES = {"block": ["exact", "none"], "causal": ["exact", "none"], "full": ["dual", "prefix", "none"]}
BLOCK = 4
CTX = 64
POLICIES = ["topk", "threshold", "factor", "entropy", "margin"]
pytestmark = pytest.mark.timeout(120)  # a request that never finishes fails instead of hanging


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here runs on one intra-op thread (the machine is shared)."""


def make_model(tok: Tokenizer, attention: str, seed: int = 0, peak: float = 1.0) -> Pretrained:
    return random_pretrained(tok, attention, seed=seed, block_size=BLOCK, max_seq_len=CTX, peak=peak)


@pytest.fixture(scope="module")
def models(tok):
    return {a: make_model(tok, a) for a in ("block", "full", "causal")}


@pytest.fixture
def fresh(tok):
    """A new model per test, for tests that rewrite its forward."""
    return lambda attention, seed=0, peak=1.0: make_model(tok, attention, seed, peak)


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 250, (n,), generator=g).tolist()


def bias_eos(model: Pretrained, force_at: int | None = None) -> None:
    """Rewrite the model's logits: EOS is never predicted, except at absolute canvas position
    `force_at`, where it is all but certain. Works for the reference's calls (logits_from/to) and the
    engine's ragged ones (positions + logits_at)."""
    eos = model.config.eos_token_id
    orig = model.net.forward

    def forward(idx, positions=None, attn_mask=None, kv_cache=None, logits_from=0, logits_to=None,
                logits_at=None, packed=None):
        logits = orig(idx, positions, attn_mask, kv_cache, logits_from, logits_to, logits_at, packed=packed).clone()
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device) if positions is None else positions
        pos = pos.expand(B, T) if pos.dim() == 1 else pos
        pos = pos.gather(1, logits_at) if logits_at is not None else pos[:, logits_from:logits_to]
        logits[..., eos] = -1e4
        if force_at is not None:
            logits[pos == force_at, eos] = 1e4
        return logits

    model.net.forward = forward


def record_windows(engine: Engine) -> list[tuple[list[str], list, list[torch.Tensor], torch.Tensor]]:
    """Record every runner call: request ids, windows, canvases (before the step) and logits."""
    calls = []
    orig = engine.runner.forward

    def forward(canvases, windows, tables, scratch=None):
        ids = [r.id for r in engine.scheduler.running]
        before = [c.clone() for c in canvases]
        logits, valid = orig(canvases, windows, tables, scratch)
        calls.append((ids, list(windows), before, logits.clone()))
        return logits, valid

    engine.runner.forward = forward
    return calls


def run_loop(engine: Engine, items, on_step=None):
    """items: (arrival step, prompt, params). Adds each request at its arrival step, between
    `engine.step()` calls; returns the finished RequestOutputs in item order."""
    order = sorted(range(len(items)), key=lambda i: items[i][0])
    rid_of, outs, step = {}, {}, 0
    while order or engine.has_work():
        while order and items[order[0]][0] <= step:
            i = order.pop(0)
            rid_of[engine.add_request(items[i][1], items[i][2])] = i
        for ev in engine.step():
            if ev.finished:
                outs[rid_of[ev.request_id]] = ev.output
        if on_step is not None:
            on_step(engine)
        step += 1
        assert step < 5000, "the engine made no progress"
    return [outs[i] for i in range(len(items))]


# ---- 1. reference equivalence --------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["block", "full", "causal"])
def test_uncached_engine_equals_reference_greedy(models, attention):
    model = models[attention]
    engine = Engine(model, cache="none")
    cases = [(n, mt, bs) for n in (1, 3, 4, 5, 9) for mt, bs in ((7, 4), (10, 5))]
    for n, mt, bs in cases:
        prompt = prompt_ids(n, seed=n + mt)
        ref = reference_generate(model, prompt, max_tokens=mt, steps=mt, block_size=bs, policy="topk")
        out = engine.generate([prompt], SamplingParams(max_tokens=mt, steps=mt, block_size=bs, policy="topk",
                                                       temperature=0.0))[0]
        assert out.token_ids == ref.token_ids, (n, mt, bs)
        assert out.text == ref.text
        assert (out.nfe, out.finish_reason) == (ref.nfe, ref.finish_reason)
        assert out.prompt_tokens == n and out.completion_tokens == len(ref.token_ids)
    # All prompts in one batch: still the reference's output, each.
    prompts = [prompt_ids(n, seed=n + 7) for n, _, _ in cases[::2]]
    outs = engine.generate(prompts, SamplingParams(max_tokens=7, steps=7, block_size=4))
    for p, o in zip(prompts, outs):
        assert o.token_ids == reference_generate(model, p, max_tokens=7, block_size=4).token_ids


def test_uncached_engine_equals_reference_text_and_infill(models):
    model = models["full"]
    engine = Engine(model, cache="none")
    for prompt, suffix in (("def add(a, b):", None), ("class Stack:\n", "        self.items"), ("x", "")):
        ref = reference_generate(model, prompt, max_tokens=9, block_size=4, suffix=suffix)
        # heal=False: the reference sampler takes a prompt ending in a newline as it is
        out = engine.generate([prompt], SamplingParams(max_tokens=9, block_size=4, suffix=suffix, heal=False))[0]
        assert (out.token_ids, out.text, out.nfe) == (ref.token_ids, ref.text, ref.nfe)


@pytest.mark.parametrize("layout", ["psm", "spm"])
@pytest.mark.parametrize("attention", ["block", "causal"])
def test_cached_engine_infill_equals_reference_in_the_models_fim_layout(fresh, tok, attention, layout):
    model = fresh(attention)
    model.generation = model.generation.model_copy(update={"fim_layout": layout})
    prefix, suffix = "def add(a, b):", "\n    return c\n"
    engine = Engine(model)
    rid = engine.add_request(prefix, SamplingParams(max_tokens=8, steps=8, block_size=4, suffix=suffix, heal=False))
    pre, suf = tok.encode(prefix), tok.encode(suffix)
    want = ([tok.fim_suffix_id, *suf, tok.fim_prefix_id, *pre] if layout == "spm"
            else [tok.fim_prefix_id, *pre, tok.fim_suffix_id, *suf, tok.fim_middle_id])
    assert engine._requests[rid].head == want
    out = {}
    while engine.has_work():
        out.update({e.request_id: e.output for e in engine.step() if e.finished})
    ref = reference_generate(model, prefix, suffix=suffix, max_tokens=8, steps=8, block_size=4)
    assert out[rid].token_ids == ref.token_ids


@pytest.mark.parametrize("attention", ["block", "full", "causal"])
def test_uncached_engine_equals_reference_seeded_sampling(models, attention):
    model = models[attention]
    engine = Engine(model, cache="none")
    for seed, n, temp, top_p in ((0, 5, 1.0, 1.0), (1, 3, 0.7, 0.9), (2, 8, 2.0, 1.0)):
        prompt = prompt_ids(n, seed)
        ref = reference_generate(model, prompt, max_tokens=10, temperature=temp, top_p=top_p, seed=seed)
        out = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=temp, top_p=top_p,
                                                       seed=seed))[0]
        assert out.token_ids == ref.token_ids and out.nfe == ref.nfe
    # The seed matters (so the comparison above is not vacuous).
    a = [engine.generate([prompt_ids(5)], SamplingParams(max_tokens=10, temperature=1.0, seed=s))[0].token_ids
         for s in range(4)]
    assert len({tuple(x) for x in a}) > 1


# ---- 2. batch invariance -------------------------------------------------------------------------

def random_params(rng: random.Random, attention: str) -> SamplingParams:
    policy = rng.choice(POLICIES)
    max_tokens = rng.randint(1, 14)
    kw = dict(max_tokens=max_tokens, policy=policy, temperature=0.0)
    if policy == "topk":
        kw["steps"] = rng.randint(1, max_tokens)
    elif policy in ("threshold", "margin"):
        kw["threshold"] = rng.choice([0.05, 0.1, 0.3, 0.9])
    elif policy == "factor":
        kw["threshold"] = rng.choice([0.5, 1.0, 2.0])
    else:
        kw["threshold"] = rng.choice([0.3, 1.0, 3.0])
    if policy != "topk":
        kw["fallback"] = rng.choice([None, "best", "leftmost"])
    if attention == "full":
        kw["block_size"] = rng.choice([3, 4, 8])
    return SamplingParams(**kw)


@pytest.mark.parametrize("attention,cache", [(a, c) for a, cs in CACHES.items() for c in cs])
def test_batch_invariance_random_mixes(models, attention, cache):
    """At temperature 0 a request's output does not depend on what it is batched with."""
    model = models[attention]
    multi = 0
    for mix in range(24):
        rng = random.Random(1000 * mix + len(cache))
        items = [(rng.randint(0, 6), prompt_ids(rng.randint(1, 20), rng.randrange(10**6)),
                  random_params(rng, attention)) for _ in range(rng.randint(2, 6))]
        lookahead = mix % 2 == 0
        engine = Engine(model, cache=cache, max_batch=rng.choice([2, 4, 8]), lookahead=lookahead)
        alone = [engine.generate([p], sp)[0] for _, p, sp in items]
        max_running = []
        batched = run_loop(engine, items, on_step=lambda e: max_running.append(e.num_running))
        multi += max(max_running) > 1
        for i, (a, b) in enumerate(zip(alone, batched)):
            assert a.token_ids == b.token_ids, (mix, i, items[i][2])
            assert a.finish_reason == b.finish_reason, (mix, i)
            if engine.lookahead:  # rows ride in free batch slots: alone, every chance is taken
                assert a.nfe <= b.nfe, (mix, i)
            else:
                assert a.nfe == b.nfe, (mix, i)
    assert multi >= 16  # the mixes really were batched


def test_batch_invariance_seeded_sampling(models):
    """A seeded sampling request draws its noise from its own generator: same output in any batch."""
    model = models["block"]
    engine = Engine(model)
    items = [(k, prompt_ids(3 + 2 * k, k), SamplingParams(max_tokens=9, temperature=1.0, seed=k,
                                                          policy=("topk", "threshold")[k % 2], threshold=0.1))
             for k in range(4)]
    alone = [engine.generate([p], sp)[0].token_ids for _, p, sp in items]
    assert [o.token_ids for o in run_loop(engine, items)] == alone


# ---- 3. exact cache ------------------------------------------------------------------------------

def test_block_exact_cache_equals_uncached(models):
    model = models["block"]
    # Lookahead off: its extra rows and skipped forwards are tested in test_lookahead.py.
    cached, plain = Engine(model, cache="exact", lookahead=False), Engine(model, cache="none")
    calls = record_windows(cached)
    for n in (1, 2, 4, 5, 7, 8, 13):
        for mt in (1, 4, 11):
            sp = SamplingParams(max_tokens=mt, steps=mt)
            prompt = prompt_ids(n, 10 * n + mt)
            a, b = cached.generate([prompt], sp)[0], plain.generate([prompt], sp)[0]
            assert (a.token_ids, a.nfe, a.finish_reason) == (b.token_ids, b.nfe, b.finish_reason), (n, mt)
    # The cache is really used: after a request's first forward (the prefill), a forward holds at
    # most the finished block and the active one, from a block boundary to the active block's end.
    seen = set()
    for ids, windows, _, _ in calls:
        (rid,), (w,) = ids, windows
        assert w.key_end == w.end == w.hi
        if rid in seen:
            assert w.end - w.start <= 2 * BLOCK and w.start % BLOCK == 0
        seen.add(rid)


def test_causal_exact_cache_equals_naive_greedy_loop(models):
    model = models["causal"]
    engine = Engine(model, cache="exact")
    calls = record_windows(engine)
    mask_id, eos = model.config.mask_token_id, model.config.eos_token_id
    for n in (1, 4, 9):
        prompt = prompt_ids(n, n)
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(12):
                logits = model.net(torch.tensor([ids]))[0, -1]
                logits[mask_id] = float("-inf")
                ids.append(int(logits.argmax()))
                if ids[-1] == eos:
                    break
        generated = ids[n:]
        out = engine.generate([prompt], SamplingParams(max_tokens=12))[0]
        assert out.token_ids == [t for t in generated if t != eos]
        assert out.nfe == len(generated)
        assert out.finish_reason == ("stop" if eos in generated else "length")
    # One query token per forward after each request's prefill.
    assert sum(w.start == 0 for _, (w,), _, _ in calls) == 3
    assert all(w.start == 0 or w.end - w.start == 1 for _, (w,), _, _ in calls)


# ---- 4. approximate cache ------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_refresh_step_equals_uncached_forward(models, cache):
    model = models["full"]
    engine = Engine(model, cache=cache, refresh_interval=3)
    calls = record_windows(engine)
    prompts = [prompt_ids(n, n) for n in (2, 7, 12)]
    engine.generate(prompts, [SamplingParams(max_tokens=mt, block_size=bs)
                              for mt, bs in ((9, 4), (14, 5), (6, 3))])
    refreshes = 0
    for _, windows, canvases, logits in calls:
        for row, (w, canvas) in enumerate(zip(windows, canvases)):
            if w.start == 0 and w.end == len(canvas):
                want = model.net(canvas[None])[0, w.lo:w.hi]
                torch.testing.assert_close(logits[row, : w.hi - w.lo], want, atol=1e-5, rtol=0)
                refreshes += 1
            else:  # a cached step forwards the block (dual) or the block and the suffix (prefix)
                assert (w.start, w.end) == ((w.lo, w.hi) if cache == "dual" else (w.lo, len(canvas)))
    assert refreshes >= 10


@pytest.mark.parametrize("cache", ["dual", "prefix"])
def test_refresh_interval(models, cache):
    model = models["full"]
    plain = Engine(model, cache="none")
    every = Engine(model, cache=cache, refresh_interval=1)
    for n in (0, 3, 8):  # an empty prompt too: its first block starts at position 0
        for seed in range(3):
            prompt = prompt_ids(n, seed)
            sp = SamplingParams(max_tokens=16, block_size=8)
            assert every.generate([prompt], sp)[0].token_ids == plain.generate([prompt], sp)[0].token_ids
    # refresh_interval=k: a block's steps 0, k, 2k, ... are refreshes (full forwards).
    for k in (None, 1, 2, 3):
        for n in (0, 8):
            engine = Engine(model, cache=cache, refresh_interval=k)
            calls = record_windows(engine)
            engine.generate([prompt_ids(n)], SamplingParams(max_tokens=16, block_size=8))
            full = [w.start == 0 and w.end == n + 16 for _, (w,), _, _ in calls]
            expect = [i % 8 == 0 if k is None else i % 8 % k == 0 for i in range(16)]
            if n == 0 and cache == "prefix":  # with the block at 0 a prefix-cache step is a full forward
                expect[:8] = [True] * 8
            assert full == expect, (k, n)
    # Without refreshes inside a block the approximation shows (the test above is not vacuous).
    stale = Engine(model, cache="dual")
    differs = sum(stale.generate([prompt_ids(3, s)], SamplingParams(max_tokens=16, block_size=8))[0].token_ids
                  != plain.generate([prompt_ids(3, s)], SamplingParams(max_tokens=16, block_size=8))[0].token_ids
                  for s in range(3))
    assert differs > 0


# ---- 5. scheduler and KV budget ------------------------------------------------------------------

def check_pages(engine: Engine) -> None:
    cache = engine.cache
    held = [p for r in engine.scheduler.running for p in r.pages]
    assert len(held) == len(set(held)) and 0 not in held  # no page shared; scratch page 0 never lent
    assert not any(r.pages for r in engine.scheduler.waiting)
    assert len(held) + cache.free_pages == cache.n_pages - 1


@pytest.mark.parametrize("attention,cache", [("block", "exact"), ("causal", "exact"), ("full", "dual")])
def test_small_kv_budget(models, attention, cache):
    model = models[attention]
    prompts = [prompt_ids(n, n) for n in (5, 9, 3, 12, 7, 10)]
    params = [SamplingParams(max_tokens=mt) for mt in (12, 9, 14, 10, 12, 11)]
    want = Engine(model, cache=cache).generate(prompts, params)
    engine = Engine(model, cache=cache, kv_budget_tokens=24, max_batch=8)  # about 2 requests' worth
    free0 = engine.cache.free_pages
    delayed = []

    def on_step(e):
        check_pages(e)
        delayed.append(e.num_waiting > 0 and e.num_running < e.max_batch)

    outs = run_loop(engine, [(0, p, sp) for p, sp in zip(prompts, params)], on_step)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert all(o.finish_reason == w.finish_reason for o, w in zip(outs, want))
    preempted = engine.scheduler.preemptions
    assert preempted == sum(o.preemptions for o in outs)
    assert preempted > 0 or any(delayed)
    if attention == "block":  # fused 2-block windows outgrow the admission headroom: preemption happens
        assert preempted > 0
    assert engine.cache.free_pages == free0 and not engine.has_work()
    # A request larger than the whole budget is refused up front; the engine still serves.
    with pytest.raises(UserError, match="kv_budget_tokens"):
        engine.add_request(prompt_ids(20), SamplingParams(max_tokens=20))
    assert engine.generate([prompts[0]], params[0])[0].token_ids == want[0].token_ids


# ---- 6. stopping and streaming -------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["block", "full", "causal"])
def test_eos_stops_at_end_of_block(fresh, attention):
    model = fresh(attention)
    bias_eos(model, force_at=6 + 3)  # prompt of 6: EOS at generated index 3 (block [8, 12))
    eos, mask = model.config.eos_token_id, model.config.mask_token_id
    prompt = prompt_ids(6)
    ref = reference_generate(model, prompt, max_tokens=14)
    for cache in CACHES[attention]:
        engine = Engine(model, cache=cache)
        events = list(engine.stream(prompt, SamplingParams(max_tokens=14, stream_canvas=True)))
        out, canvas = events[-1].output, events[-1].canvas
        assert out.finish_reason == "stop" == ref.finish_reason
        if cache in ("exact", "none"):
            assert out.token_ids == ref.token_ids
        assert eos not in out.token_ids
        if attention == "causal":  # the logits at position 9 predict position 10
            assert len(out.token_ids) == 4 and out.nfe == ref.nfe == 5
            assert canvas[4] == eos and canvas[5:] == [mask] * 9
        else:  # blocks [6, 8) and [8, 12) ran; [12, 16) and [16, 20) never started
            assert len(out.token_ids) == 3 and out.nfe == ref.nfe == 2 + 4
            assert canvas[3] == eos
            assert all(t != mask for t in canvas[:6]) and canvas[6:] == [mask] * 8


def test_max_tokens_gives_length(fresh):
    model = fresh("block")
    bias_eos(model)
    for cache in ("exact", "none"):
        out = Engine(model, cache=cache).generate([prompt_ids(5)], SamplingParams(max_tokens=7))[0]
        assert out.finish_reason == "length" and out.completion_tokens == 7 == len(out.token_ids)


def stream_all(engine: Engine, prompts, params):
    """Run requests together; return per request (events, concatenated deltas)."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    events = {r: [] for r in rids}
    while engine.has_work():
        for ev in engine.step():
            events[ev.request_id].append(ev)
    return [(events[r], "".join(e.delta for e in events[r])) for r in rids]


@pytest.mark.parametrize("attention", ["block", "full", "causal"])
def test_stop_strings_and_streamed_deltas(fresh, attention):
    model = fresh(attention)
    bias_eos(model)
    engine = Engine(model)
    prompts = [prompt_ids(n, n) for n in (3, 6, 9, 2)]
    plain = engine.generate(prompts, SamplingParams(max_tokens=16))
    stops = []
    for o in plain:  # a stop string from the middle of each plain completion
        t = o.text
        at = next(i for i in range(2, len(t) - 2) if "\ufffd" not in t[i:i + 2])
        stops.append(t[at:at + 2])
    params = [SamplingParams(max_tokens=16, stop=[s, "\x00never"]) for s in stops]
    params[3] = SamplingParams(max_tokens=16)  # one request without stop strings in the mix
    results = stream_all(engine, prompts, params)
    for (events, streamed), o, s, sp in zip(results, plain, stops, params):
        final = events[-1].output
        assert events[-1].finished and not any(e.finished for e in events[:-1])
        assert streamed == final.text  # the deltas add up to the final text
        if sp.stop:
            assert final.finish_reason == "stop"
            assert final.text == o.text[: o.text.find(s)]
            assert s not in final.text
        else:
            assert (final.finish_reason, final.text, final.token_ids) == ("length", o.text, o.token_ids)


@pytest.mark.parametrize("attention", ["block", "full", "causal"])
def test_eos_with_unmatched_stop_strings_keeps_token_ids(fresh, attention):
    """Stop strings that never match must not change the output, even when EOS ends the request."""
    model = fresh(attention)
    bias_eos(model, force_at=5 + 6)
    engine = Engine(model)
    for seed in range(4):
        prompt = prompt_ids(5, seed)
        a = engine.generate([prompt], SamplingParams(max_tokens=12))[0]
        b = engine.generate([prompt], SamplingParams(max_tokens=12, stop=["\x00never"]))[0]
        assert a.finish_reason == b.finish_reason == "stop"
        assert (b.token_ids, b.text, b.completion_tokens) == (a.token_ids, a.text, a.completion_tokens)


@pytest.mark.parametrize("attention", ["block", "full", "causal"])
def test_stream_canvas(fresh, attention):
    model = fresh(attention)
    bias_eos(model)
    mask = model.config.mask_token_id
    engine = Engine(model)
    params = [SamplingParams(max_tokens=mt, stream_canvas=True, policy=pol, threshold=0.1)
              for mt, pol in ((10, "topk"), (7, "threshold"), (12, "entropy"))]
    results = stream_all(engine, [prompt_ids(n, n) for n in (3, 6, 5)], params)
    for (events, _), sp in zip(results, params):
        prev = [mask] * sp.max_tokens
        for ev in events:
            assert len(ev.canvas) == sp.max_tokens
            newly = [i for i in range(sp.max_tokens) if prev[i] == mask and ev.canvas[i] != mask]
            assert sorted(ev.committed) == newly and newly  # every step commits something
            assert all(ev.canvas[i] == prev[i] for i in range(sp.max_tokens) if prev[i] != mask)
            prev = ev.canvas
        assert events[-1].output.token_ids == prev  # no EOS: the whole region, nothing masked
    # Without stream_canvas, events carry no canvas.
    ev = next(engine.stream(prompt_ids(3), SamplingParams(max_tokens=4)))
    assert ev.canvas is None and ev.committed is None


# ---- 7. errors -----------------------------------------------------------------------------------

BAD = [
    (dict(policy="nope"), "unknown policy 'nope'"),
    (dict(policy="threshold", threshold=0.0), r"threshold must be in \(0, 1\]"),
    (dict(policy="threshold", threshold=1.5), r"threshold must be in \(0, 1\]"),
    (dict(policy="margin", threshold=-0.1), r"threshold must be in \(0, 1\]"),
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(max_tokens=-3), "max_tokens must be at least 1"),
    (dict(max_tokens=CTX), "lower --max-tokens"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(temperature=-1.0), "temperature"),
    (dict(stop=[""]), "stop strings must not be empty"),
    (dict(policy="threshold", fallback="left"), "unknown fallback 'left'; choose one of: best, leftmost"),
]


@pytest.mark.parametrize("attention", ["block", "causal", "full"])
def test_bad_requests_are_refused_and_do_not_disturb_others(models, attention):
    model = models[attention]
    engine = Engine(model)
    good = [prompt_ids(n, n) for n in (3, 8, 5)]
    want = [o.token_ids for o in Engine(model).generate(good, SamplingParams(max_tokens=9))]
    bad = [(prompt_ids(4), kw, msg) for kw, msg in BAD] + [(prompt_ids(CTX), {}, "leaving no room")]
    rids, outs = [], {}
    for step in range(200):
        if step < len(good):
            rids.append(engine.add_request(good[step], SamplingParams(max_tokens=9)))
        if step < len(bad):
            prompt, kw, msg = bad[step]
            n_waiting, n_running = engine.num_waiting, engine.num_running
            with pytest.raises(UserError, match=msg):
                engine.add_request(prompt, SamplingParams(**kw))
            assert (engine.num_waiting, engine.num_running) == (n_waiting, n_running)
        for ev in engine.step():
            if ev.finished:
                outs[ev.request_id] = ev.output
        if len(outs) == len(good) and step >= len(bad):
            break
    assert [outs[r].token_ids for r in rids] == want
    assert all(outs[r].error is None for r in rids)
    engine.add_request(good[0], request_id="x")
    with pytest.raises(UserError, match="already in use"):
        engine.add_request(good[1], request_id="x")
    engine.abort("x")
    # generate() validates everything before anything runs.
    with pytest.raises(UserError, match="prompt 1"):
        engine.generate(good[:2], [SamplingParams(), SamplingParams(policy="nope")])


def test_engine_construction_errors(models):
    with pytest.raises(UserError, match="does not apply"):
        Engine(models["block"], cache="dual")
    with pytest.raises(UserError, match="does not apply"):
        Engine(models["full"], cache="exact")
    with pytest.raises(UserError, match="max_batch"):
        Engine(models["full"], max_batch=0)
    with pytest.raises(UserError, match="empty"):
        Engine(models["causal"]).add_request("")


@pytest.mark.parametrize("attention", ["block", "causal", "full"])
def test_abort_frees_pages(models, attention):
    model = models[attention]
    engine = Engine(model, max_batch=2)
    free0 = engine.cache.free_pages
    prompts = [prompt_ids(n, n) for n in (4, 7, 5)]
    want = Engine(model).generate([prompts[1]], SamplingParams(max_tokens=10))[0].token_ids
    a, b, c = (engine.add_request(p, SamplingParams(max_tokens=10)) for p in prompts)
    engine.step()
    engine.step()
    running = {r.id: r for r in engine.scheduler.running}
    assert set(running) == {a, b} and running[a].pages and engine.num_waiting == 1
    held = list(running[a].pages)
    engine.abort(a)
    engine.abort(c)  # still waiting
    assert running[a].pages == [] and not set(held) - set(engine.cache._free)
    assert engine.num_running == 1 and engine.num_waiting == 0
    outs = []
    while engine.has_work():
        outs += [ev.output for ev in engine.step() if ev.finished]
    assert [o.request_id for o in outs] == [b] and outs[0].token_ids == want
    assert engine.cache.free_pages == free0
    engine.abort("no-such-request")  # a no-op


# ---- 8. NFE and TPF ------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["block", "full", "causal"])
def test_nfe_topk_one_token_per_forward(fresh, attention):
    model = fresh(attention)
    bias_eos(model)  # no EOS: every request runs to max_tokens
    for cache in CACHES[attention]:
        engine = Engine(model, cache=cache, lookahead=False)  # lookahead: test_lookahead.py
        for n, mt in ((3, 9), (4, 8), (1, 13)):
            out = engine.generate([prompt_ids(n)], SamplingParams(max_tokens=mt, steps=mt))[0]
            assert out.nfe == mt == out.completion_tokens and out.tokens_per_forward == 1.0
            if attention != "causal":  # fewer steps: one forward per step (at least one per block)
                out = engine.generate([prompt_ids(n)], SamplingParams(max_tokens=mt, steps=5))[0]
                assert out.nfe == 5 and out.completion_tokens == mt


@pytest.mark.parametrize("attention", ["block", "full"])
def test_threshold_policy_commits_several_tokens_per_forward(fresh, attention):
    model = fresh(attention, peak=8.0)
    bias_eos(model)
    engine = Engine(model)
    outs = engine.generate([prompt_ids(n, n) for n in (4, 5, 9)],
                           SamplingParams(max_tokens=16, policy="threshold", threshold=0.9))
    for o in outs:
        assert o.completion_tokens == 16 and o.nfe < 16
        assert o.tokens_per_forward == o.completion_tokens / o.nfe > 1.0
    assert min(o.nfe for o in outs) >= 4  # at least one forward per block


def test_leftmost_fallback_equals_naive_left_to_right_loop(fresh):
    """Threshold 1.0 commits nothing by its rule, so the leftmost fallback writes each block in
    position order, one token per forward: the same tokens as an uncached greedy loop that fills the
    leftmost mask of the current block from a full forward of the canvas."""
    from unmask.sampling import block_spans

    model = fresh("block")
    bias_eos(model)
    mask_id = model.config.mask_token_id
    engine = Engine(model, lookahead=False)  # one token per forward (lookahead: test_lookahead.py)
    for n, mt in ((1, 5), (3, 9), (6, 12)):
        prompt = prompt_ids(n, 7 * n)
        canvas = torch.tensor(prompt + [mask_id] * mt)
        with torch.no_grad():
            for b, e in block_spans(n, n + mt, BLOCK):
                for i in range(b, e):
                    logits = model.net(canvas[None], logits_from=b, logits_to=e)[0, i - b]
                    logits[mask_id] = float("-inf")
                    canvas[i] = int(logits.argmax())
        out = engine.generate([prompt], SamplingParams(max_tokens=mt, policy="threshold", threshold=1.0,
                                                       fallback="leftmost"))[0]
        assert out.token_ids == canvas[n:].tolist() and out.nfe == mt
        best = engine.generate([prompt], SamplingParams(max_tokens=mt, policy="threshold", threshold=1.0))[0]
        assert best.nfe == mt


@pytest.mark.parametrize("attention", ["block", "causal"])
def test_chat_turn_ends_at_end_of_turn_token(fresh, attention):
    """A chat reply stops at `<|end|>` (not only EOS); a plain prompt does not stop there."""
    model = fresh(attention)
    end = model.tokenizer.end_id
    chat = [{"role": "user", "content": "hi"}]
    n_head = len(model.tokenizer.encode_chat(chat))
    orig = model.net.forward

    def forward(idx, positions=None, attn_mask=None, kv_cache=None, logits_from=0, logits_to=None, logits_at=None,
                packed=None):
        logits = orig(idx, positions, attn_mask, kv_cache, logits_from, logits_to, logits_at, packed=packed).clone()
        B, T = idx.shape
        pos = torch.arange(T).expand(B, T) if positions is None else positions.expand(B, T)
        pos = pos.gather(1, logits_at) if logits_at is not None else pos[:, logits_from:logits_to]
        logits[..., model.config.eos_token_id] = -1e4
        logits[..., end] = -1e4
        # the third generated token (canvas position n_head + 2) is end-of-turn; a causal model
        # predicts position i from the logits at i - 1
        logits[pos == n_head + 2 - (attention == "causal"), end] = 1e4
        return logits

    model.net.forward = forward
    out = Engine(model).generate([chat], SamplingParams(max_tokens=12))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 2 and end not in out.token_ids
    plain = Engine(model).generate([model.tokenizer.encode_chat(chat)], SamplingParams(max_tokens=12))[0]
    assert plain.finish_reason == "length" and len(plain.token_ids) == 12


@pytest.mark.parametrize("attention", ["block", "causal"])
def test_prefills_get_steps_of_their_own(models, attention):
    """A newcomer's prompt is not padded into the decoding rows' forward: a step holds either
    prefill windows or decode windows, and the outputs still equal the requests run alone."""
    model = models[attention]
    limit = 2 * BLOCK if attention == "block" else 1
    items = [(0, prompt_ids(12, 1), SamplingParams(max_tokens=12, temperature=0.0)),
             (3, prompt_ids(15, 2), SamplingParams(max_tokens=8, temperature=0.0)),
             (3, prompt_ids(3, 3), SamplingParams(max_tokens=8, temperature=0.0)),
             (5, prompt_ids(18, 4), SamplingParams(max_tokens=8, temperature=0.0))]
    engine = Engine(model, max_batch=4)
    alone = [engine.generate([p], sp)[0] for _, p, sp in items]
    calls = record_windows(engine)
    batched = run_loop(engine, items)
    lengths = [[w.end - w.start for w in windows] for _, windows, _, _ in calls]
    mixed = [ls for ls in lengths if max(ls) > limit and min(ls) <= limit]
    assert not mixed, mixed
    assert any(len(ls) > 1 for ls in lengths)  # decoding was still batched
    for a, b in zip(alone, batched):
        # Lookahead rows ride in free batch slots, so alone a request may skip more forwards.
        assert a.token_ids == b.token_ids and a.nfe <= b.nfe
