"""Static shape buckets and CUDA graphs for the engine's decode steps (engine/cuda_graphs.py).

On CPU, Engine(cuda_graphs=True) runs the same padded static-shape inputs eagerly, so the
bucketing is tested here token for token against the plain engine; the CUDA test checks the
graphs themselves where a GPU is present."""
from __future__ import annotations

import pytest
import torch

from conftest import random_pretrained, tiny_config
from unmask.decode import make_plan
from unmask.engine import Engine, SamplingParams
from unmask.engine.cuda_graphs import GraphedForward, batch_bucket, key_bucket
from unmask.errors import UserError

BLOCK = 4
CTX = 96
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Every test here runs on one intra-op thread (the machine is shared)."""


@pytest.fixture(scope="module")
def models(tok):
    kw = dict(block_size=BLOCK, max_seq_len=CTX)
    return {"block": random_pretrained(tok, "block", **kw),
            "block-shift": random_pretrained(tok, "block", seed=1, token_shift=True, **kw),
            "causal": random_pretrained(tok, "causal", seed=2, **kw)}


def prompt_ids(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(20, 250, (n,), generator=g).tolist()


ITEMS = [(3, 12, "topk"), (9, 7, "threshold"), (1, 20, "topk"), (14, 5, "threshold"), (6, 16, "topk")]


def params(max_tokens: int, policy: str) -> SamplingParams:
    kw = {"steps": max_tokens} if policy == "topk" else {"threshold": 0.3}
    return SamplingParams(max_tokens=max_tokens, policy=policy, temperature=0.0, **kw)


@pytest.mark.parametrize("name", ["block", "block-shift", "causal"])
@pytest.mark.parametrize("key_multiple", [128, 16])
def test_bucketed_engine_equals_plain_engine(models, name, key_multiple):
    model = models[name]
    prompts = [prompt_ids(n, seed=n) for n, _, _ in ITEMS]
    sps = [params(mt, pol) for _, mt, pol in ITEMS]
    plain = Engine(model, max_batch=6).generate(prompts, sps)
    engine = Engine(model, max_batch=6, cuda_graphs=True)
    g = engine.runner.graphs
    g.key_multiple = key_multiple
    shapes = []
    orig = g.__call__

    class Spy(GraphedForward):  # record the padded shapes without changing what runs
        def __call__(self, x):
            shapes.append(x.key)
            return orig(x)

    g.__class__ = Spy
    outs = engine.generate(prompts, sps)
    for a, b in zip(plain, outs):
        assert (a.token_ids, a.nfe, a.finish_reason) == (b.token_ids, b.nfe, b.finish_reason)
    assert g.eager == len(shapes) > 0 and g.captures == g.replays == 0  # CPU: padded, eager
    assert {B for B, _, _, _ in shapes} >= {6, 4}  # 5 running -> 6 rows (max_batch), then fewer
    assert all(B in (1, 2, 4, 6) and A == T and T <= g.limit for B, T, _, A in shapes)
    assert all(S % key_multiple == 0 or S == CTX for _, _, S, _ in shapes)
    if key_multiple == 16:
        assert len({S for _, _, S, _ in shapes}) > 1


def test_buckets():
    assert [batch_bucket(n, 16) for n in (1, 2, 3, 4, 5, 8, 9, 16)] == [1, 2, 4, 4, 8, 8, 16, 16]
    assert [batch_bucket(n, 12) for n in (5, 8, 9, 12)] == [8, 8, 12, 12]
    assert [key_bucket(s, 128, 1024) for s in (1, 128, 129, 1000, 1024)] == [128, 128, 256, 1024, 1024]
    assert key_bucket(70, 128, 96) == 96
    for bad in ((0, 4), (5, 4)):
        with pytest.raises(ValueError):
            batch_bucket(*bad)
    with pytest.raises(ValueError):
        key_bucket(97, 128, 96)
    plans = [make_plan(tiny_config(attention=a, block_size=4)) for a in ("block", "causal", "full")]
    assert [p.decode_window for p in plans] == [8, 1, 0]


def test_padding_writes_only_scratch_page(models):
    """A padded step changes no pool row outside page 0 except the real windows' own write slots."""
    model = models["block-shift"]
    engine = Engine(model, max_batch=8, cuda_graphs=True)
    cache, runner = engine.cache, engine.runner
    for n in (5, 9, 2):
        engine.add_request(prompt_ids(n, n), params(12, "topk"))
    for _ in range(3):  # past the prefills: decode windows of one or two blocks
        engine.step()
    reqs = engine.scheduler.schedule()  # grows the page tables for the next windows, as step() would
    windows = [engine.plan.window(r) for r in reqs]
    assert all(w.end - w.start <= 2 * BLOCK for w in windows)
    tables = [r.pages for r in reqs]
    x, valid = runner.build([r.canvas for r in reqs], windows, tables, rows=8, A=2 * BLOCK, S=CTX)
    page = cache.page_size
    assert x.write[3:].eq(0).all() and x.read[3:].eq(0).all() and x.at[3:].eq(0).all()
    assert not valid[3:].any()
    real = set()
    for i, w in enumerate(windows):
        pad = x.ids.shape[1] - (w.end - w.start)
        assert x.write[i, :pad].eq(0).all()  # left padding of a shorter window: scratch too
        real |= set(x.write[i, pad:].tolist())
        assert x.read[i, w.key_end:].eq(0).all() and not x.mask[i, :, w.key_end:].any()
    assert all(s >= page for s in real)
    assert x.mask[3:, :, 0].all() and not x.mask[3:, :, 1:].any()  # padded rows see key 0 only
    k0, v0 = cache.k.clone(), cache.v.clone()
    logits, _ = runner.forward([r.canvas for r in reqs], windows, tables)
    assert torch.isfinite(logits).all()
    changed = ((cache.k != k0) | (cache.v != v0)).flatten(2).any(-1).any(0).nonzero().flatten().tolist()
    assert changed and set(changed) <= real | set(range(page))


def test_cuda_graphs_errors(models):
    with pytest.raises(UserError, match="KV cache"):
        Engine(models["block"], cache="none", cuda_graphs=True)
    with pytest.raises(UserError, match="combine"):
        Engine(models["block"], cuda_graphs=True, compile=True)
    assert Engine(models["block"]).runner.graphs is None  # off by default


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["block", "block-shift", "causal"])
def test_cuda_graphs_capture_and_replay(models, name):
    model = models[name]
    model.net.to("cuda")
    try:
        prompts = [prompt_ids(n, seed=n) for n, _, _ in ITEMS]
        sps = [params(mt, pol) for _, mt, pol in ITEMS]
        plain = Engine(model, max_batch=6).generate(prompts, sps)
        padded = Engine(model, max_batch=6, cuda_graphs=True)
        padded.runner.graphs.capture = False  # the same buckets, eager
        eager = padded.generate(prompts, sps)
        engine = Engine(model, max_batch=6, cuda_graphs=True)
        g = engine.runner.graphs
        assert g.capture
        graphed = engine.generate(prompts, sps)
        assert g.captures == len(g.graphs) > 0 and g.replays > g.captures and g.eager == 0
        for a, b, c in zip(plain, eager, graphed):
            assert b.token_ids == c.token_ids and b.nfe == c.nfe  # graph replay == its eager twin
            assert a.token_ids == c.token_ids  # and padding does not change the result
        captures, replays = g.captures, g.replays
        again = engine.generate(prompts, sps)  # every bucket is known now: no new captures
        assert [o.token_ids for o in again] == [o.token_ids for o in graphed]
        assert g.captures == captures and g.replays > replays
    finally:
        model.net.to("cpu")
