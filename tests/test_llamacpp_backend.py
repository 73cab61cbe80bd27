"""The engine's llama.cpp backend (engine/llamacpp): the same tokens as the torch backend at
temperature 0, batched == alone, block lookahead, prompts that take several decode calls,
preemption, and one-line refusals. Skipped where llama-cpp-python is not installed."""
from __future__ import annotations

import pytest
import torch

from unmask.engine import Engine, SamplingParams
from unmask.engine.llamacpp import available
from unmask.errors import UserError

from conftest import random_pretrained

pytestmark = pytest.mark.skipif(not available(), reason="llama-cpp-python is not installed")

PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push(self, x):\n", "def", "return a + b\n\nclass Stack:"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNMASK_CACHE_DIR", str(tmp_path / "cache"))


def _tokens(engine, prompts, n=24, **kw):
    outs = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, heal=False, **kw))
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("attention,shift", [("block", False), ("block", True), ("causal", False)])
def test_same_tokens_as_torch(tok, attention, shift):
    model = random_pretrained(tok, attention, peak=4.0, token_shift=shift, max_seq_len=128)
    want = _tokens(Engine(model, max_batch=4), PROMPTS)
    eng = Engine(model, max_batch=4, backend="llama.cpp")
    assert _tokens(eng, PROMPTS) == want
    # alone == batched on the llama.cpp backend too
    assert [_tokens(eng, [p])[0] for p in PROMPTS] == want
    if attention == "block":
        assert eng.core.lookahead_rows > 0  # lookahead rows ran (and changed nothing)


@pytest.mark.parametrize("per_context", [1, 3])
def test_requests_spread_over_contexts(tok, monkeypatch, per_context):
    """Requests are spread over llama.cpp contexts of `per_context` each: the same tokens."""
    import unmask.engine.llamacpp.runner as runner_mod

    monkeypatch.setattr(runner_mod, "PER_CONTEXT", per_context)
    model = random_pretrained(tok, "block", peak=4.0, token_shift=True, max_seq_len=128)
    want = _tokens(Engine(model, max_batch=4), PROMPTS)
    eng = Engine(model, max_batch=4, backend="llama.cpp")
    assert len(eng.core.runner.groups) == -(-4 // per_context)
    assert _tokens(eng, PROMPTS) == want
    assert all(g.members == 0 and g.n_free == runner_mod.MAX_SEQ for g in eng.core.runner.groups)


def test_lookahead_off_same_tokens(tok):
    model = random_pretrained(tok, "block", peak=4.0, token_shift=True, max_seq_len=128)
    on = _tokens(Engine(model, max_batch=2, backend="llama.cpp"), PROMPTS)
    off = _tokens(Engine(model, max_batch=2, backend="llama.cpp", lookahead=False), PROMPTS)
    assert on == off


def test_long_prompt_takes_several_calls(tok):
    """A prompt of many blocks is prefilled up to 13 blocks per call (a chain of sequence ids); fewer
    per call (2, or 1 through a small n_ubatch) give the same tokens."""
    from unmask.engine.llamacpp.runner import LlamaCppRunner

    model = random_pretrained(tok, "block", peak=4.0, max_seq_len=128)
    prompt = "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items"
    want = _tokens(Engine(model, max_batch=1), [prompt], n=16)
    eng = Engine(model, max_batch=1, backend="llama.cpp")
    runner = eng.core.runner
    assert isinstance(runner, LlamaCppRunner)
    assert _tokens(eng, [prompt], n=16) == want
    assert runner.chain == 13 or not __import__("sys").platform.startswith("linux")  # libstdc++: chains
    runner.chain = 2  # a call per two blocks
    before, steps = runner.decode_calls, eng.core.steps
    assert _tokens(eng, [prompt], n=16) == want
    assert runner.decode_calls - before > eng.core.steps - steps  # the prefill took more than one call
    runner.n_ubatch = 4  # one block per call
    assert _tokens(eng, [prompt], n=16) == want


def test_preemption_same_tokens(tok):
    model = random_pretrained(tok, "block", peak=4.0, max_seq_len=128)
    want = _tokens(Engine(model, max_batch=4), PROMPTS, n=40)
    eng = Engine(model, max_batch=4, backend="llama.cpp", kv_budget_tokens=96)
    assert _tokens(eng, PROMPTS, n=40) == want
    assert eng.core.scheduler.preemptions > 0
    runner = eng.core.runner
    assert len(runner._seqs) == 0  # every finished request gave its sequences back
    assert all(g.members == 0 and g.n_free == 256 for g in runner.groups)


def test_sampling_is_seeded(tok):
    model = random_pretrained(tok, "block", max_seq_len=128)
    eng = Engine(model, max_batch=2, backend="llama.cpp")
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=7, heal=False)
    one = eng.generate(PROMPTS[:2], p)
    two = eng.generate(PROMPTS[:2], p)
    assert [o.token_ids for o in one] == [o.token_ids for o in two]


@pytest.mark.parametrize("weights", ["f16", "q8_0"])
def test_quantized_weights_run(tok, weights):
    model = random_pretrained(tok, "block", peak=4.0, max_seq_len=128)
    out = _tokens(Engine(model, max_batch=2, backend="llama.cpp", quantize=weights), PROMPTS[:2], n=16)
    assert all(len(t) > 0 for t in out)


def test_refusals(tok):
    full = random_pretrained(tok, "full")
    with pytest.raises(UserError, match="use backend='torch'"):
        Engine(full, backend="llama.cpp")
    block = random_pretrained(tok, "block")
    with pytest.raises(UserError, match="does not apply to backend 'llama.cpp'"):
        Engine(block, backend="llama.cpp", quantize="int8wo")
    with pytest.raises(UserError, match="llama.cpp weight type"):
        Engine(block, quantize="q8_0")
    with pytest.raises(UserError, match="drop compile"):
        Engine(block, backend="llama.cpp", compile=True)
    with pytest.raises(UserError, match="choose one of"):
        Engine(block, backend="onnx")
    with pytest.raises(UserError, match="needs the exact KV cache"):
        Engine(block, backend="llama.cpp", cache="none")


def test_gguf_is_cached(tok, tmp_path):
    from unmask.engine.llamacpp.export import cache_dir, runner_gguf

    model = random_pretrained(tok, "block")
    p1 = runner_gguf(model.net, model.config, "f32")
    mtime = p1.stat().st_mtime_ns
    assert runner_gguf(model.net, model.config, "f32") == p1 and p1.stat().st_mtime_ns == mtime
    assert p1.parent == cache_dir()
    with torch.no_grad():
        model.net.norm.weight.add_(1.0)
    assert runner_gguf(model.net, model.config, "f32") != p1  # other weights, other file
