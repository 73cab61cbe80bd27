"""Every parameter the real clients send is taken: Inception's `inceptionai` (chat and FIM) and
OpenAI's `openai` against a live server; what is honoured changes decoding (reasoning_effort
presets, top_k, repetition / presence / frequency penalties), what is ignored is named in the
X-Unmask-Ignored header, and a typo in one of our own fields is still a 400."""
from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from inceptionai import Inception

from conftest import random_pretrained
from test_server_support import live
from unmask.config import DecodingPreset
from unmask.engine import Engine, SamplingParams
from unmask.errors import UserError
from unmask.frontend.params import resolve
from unmask.sampling.noise import top_k_filter
from unmask.sampling.penalties import penalise

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model(tok):
    return random_pretrained(tok, "block", max_seq_len=192)


@pytest.fixture(scope="module")
def srv(model):
    with live(model) as s:
        yield s


# ---- what the engine honours ----------------------------------------------------------------------
def test_reasoning_effort_presets(model):
    gen = model.generation
    assert resolve(model, SamplingParams(reasoning_effort="instant"), 4).threshold == 0.5
    high = resolve(model, SamplingParams(reasoning_effort="high"), 4)
    assert (high.policy, high.threshold) == ("threshold", 0.9)
    medium = resolve(model, SamplingParams(reasoning_effort="medium"), 4)
    assert (medium.policy, medium.threshold) == (gen.policy, gen.threshold)
    assert resolve(model, SamplingParams(reasoning_effort="high", threshold=0.3), 4).threshold == 0.3
    own = model.generation.model_copy(update={"presets": {"high": DecodingPreset(policy="topk", steps=64)}})
    m2 = type(model)(model.net, model.tokenizer, model.config, own)
    assert resolve(m2, SamplingParams(reasoning_effort="high", max_tokens=64), 4).policy == "topk"
    with pytest.raises(UserError, match="reasoning_effort 'max'"):
        resolve(model, SamplingParams(reasoning_effort="max"), 4)


def test_penalties_follow_their_definitions():
    class R:  # a request with output tokens [3, 3, 5] and prompt [7]; stop id 0
        canvas, lo, hi, head, tail = torch.tensor([7, 3, 3, 5, 1]), 1, 5, [7], []
        stop_ids = frozenset({0})

    from unmask.frontend.params import Resolved
    logits = torch.tensor([[[1.0, -1.0, 0.5, 2.0, 0.0, -2.0, 3.0, 4.0]]])
    R.s = Resolved(8, 8, 4, 0.0, 1.0, "topk", 0, 0.0, (), 0, 0, 2.0, 0.5, 0.25)
    out = penalise(logits, [R], mask_id=1)[0, 0]
    want = logits[0, 0].clone()
    want[3] = 2.0 / 2 - 0.5 - 0.25 * 2  # in the output twice
    want[5] = -2.0 * 2 - 0.5 - 0.25  # once, negative: multiplied
    want[7] = 4.0 / 2  # in the prompt only: repetition penalty, no presence / frequency
    assert torch.allclose(out, want)
    plain = [type("P", (), {"s": Resolved(8, 8, 4, 0.0, 1.0, "topk")})()]
    assert penalise(logits, plain, 1) is logits  # nothing to do: the very same tensor
    assert torch.equal(top_k_filter(torch.tensor([1.0, 3.0, 2.0]), 2), torch.tensor([float("-inf"), 3.0, 2.0]))


def test_top_k_one_sampling_is_greedy_and_penalties_change_greedy_output(model):
    eng = Engine(model, max_batch=4)
    greedy = eng.generate(["def add(a, b):"], SamplingParams(max_tokens=24))[0].text
    top1 = eng.generate(["def add(a, b):"], SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=3))[0].text
    assert top1 == greedy
    rep = eng.generate(["def add(a, b):"], SamplingParams(max_tokens=24, repetition_penalty=3.0))[0].text
    assert rep != greedy
    with pytest.raises(UserError, match="repetition_penalty"):
        eng.add_request("x", SamplingParams(repetition_penalty=0.0))


# ---- the real clients ----------------------------------------------------------------------------
def test_inception_client_chat_and_fim(srv):
    client = Inception(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "a record"}],
                                       max_tokens=64, reasoning_effort="instant", realtime=True,
                                       reasoning_summary=False, reasoning_summary_wait=False, diffusing=False,
                                       temperature=0.0, stop=["\n\n"],
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "r", "schema": {"type": "object", "properties": {
                                               "a": {"type": "integer"}}, "required": ["a"]}, "strict": True}},
                                       extra_params={"policy": "threshold"})
    assert isinstance(json.loads(r.choices[0].message.content)["a"], int)
    f = client.fim.completions.create(model=model, prompt="def add(a, b):\n    return ", suffix="\n", max_tokens=16,
                                      top_k=5, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.1,
                                      top_p=0.9, stop=["\n"])
    assert f.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.fim.completions.create(model=model, prompt="x = ", suffix="\n", max_tokens=8, stream=True,
                                                top_k=-1, stream_options={"include_usage": True}))
    assert chunks and chunks[-1].usage is not None


def test_openai_client_fields_honoured_or_named_as_ignored(srv):
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "service_tier": "auto",
            "prediction": {"type": "content", "content": "hello"}, "modalities": ["text"], "realtime": True,
            "presence_penalty": 0.5, "reasoning_effort": "low"}
    body.pop("model")
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-unmask-ignored"] == "realtime, service_tier, prediction"
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    out = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=4,
                                         messages=[{"role": "user", "content": "hi"}], service_tier="auto",
                                         frequency_penalty=1.0, presence_penalty=-0.5, reasoning_effort="low")
    assert out.choices[0].message.content is not None


@pytest.mark.parametrize("field, value", [("reasoning_efort", "low"), ("policyy", "topk"), ("modalities", ["audio"]),
                                          ("reasoning_effort", "max"), ("top_k", -2), ("repetition_penalty", 0)])
def test_typos_and_impossible_values_are_400(srv, field, value):
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, field: value}, timeout=60)
    assert r.status_code == 400 and field in (r.json()["error"]["param"] or ""), r.text
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "extra_body": {field: value}},
                   timeout=60)
    assert r.status_code == 400, r.text


def test_a_preset_does_not_lend_its_threshold_to_another_policy(model):
    s = resolve(model, SamplingParams(reasoning_effort="high", policy="entropy"), 4)
    assert (s.policy, s.threshold) == ("entropy", 0.1)  # entropy's own default budget, not tau 0.9
