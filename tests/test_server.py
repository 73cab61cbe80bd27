"""The HTTP API against a live server on loopback: the official openai client, Mercury-style FIM with
plain httpx, the diffusing stream, and every kind of bad input answered 4xx in OpenAI's error JSON."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from test_server_support import live, tiny, tiny_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def srv(tiny):  # noqa: F811
    with live(tiny) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _ids_ok(r, prefix, obj):
    assert r.id.startswith(prefix + "-") and len(r.id) > len(prefix) + 8
    assert r.object == obj
    assert abs(r.created - time.time()) < 60
    assert r.model == "tiny"


def test_models_and_health(srv):
    models = httpx.get(srv.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    h = httpx.get(srv.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == "tiny" and h["device"] == "cpu"


def test_completion(client):
    r = client.completions.create(model="tiny", prompt="def add(", max_tokens=8, temperature=0)
    _ids_ok(r, "cmpl", "text_completion")
    c = r.choices[0]
    assert c.finish_reason in ("stop", "length") and c.text
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    st = r.model_extra["stats"]
    assert st["nfe"] >= 1 and st["tokens_per_forward"] == pytest.approx(r.usage.completion_tokens / st["nfe"], 1e-3)


def test_completion_extensions_change_decoding(client):
    base = dict(model="tiny", prompt="class Stack", max_tokens=16, temperature=0)
    topk = client.completions.create(**base, extra_body={"policy": "topk", "steps": 4})
    assert topk.model_extra["stats"]["nfe"] <= 5  # about one step per 4-token block (the first may be partial)
    assert client.completions.create(**base).model_extra["stats"]["nfe"] == 16  # default: one token per step
    thr = client.completions.create(**base, extra_body={"policy": "threshold", "threshold": 0.5})
    assert 4 <= thr.model_extra["stats"]["nfe"] <= 16
    # tau = 1 passes nothing, so every step falls back to one position: the leftmost, in order.
    left = client.completions.create(**base, extra_body={"policy": "threshold", "threshold": 1.0,
                                                         "fallback": "leftmost"})
    assert left.model_extra["stats"]["nfe"] == left.usage.completion_tokens


def test_chat(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "Reverse a string."}],
                                       max_tokens=8, temperature=0)
    _ids_ok(r, "chatcmpl", "chat.completion")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.total_tokens > 8


def test_streaming_matches_non_streaming(client):
    kw = dict(model="tiny", prompt="for i in", max_tokens=16, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_streaming_with_usage(client):
    msgs = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.id.startswith("chatcmpl-") and c.object == "chat.completion.chunk" for c in chunks)


def test_chat_diffusing(srv):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True, "diffusing": True}
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
        chunks = _sse(r)[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["canvas"]["step"] for c in chunks] == list(range(1, len(chunks) + 1))
    assert chunks[-1]["choices"][0]["canvas"]["masked"] == 0 and chunks[-1]["usage"]["completion_tokens"] <= 8


def test_fim_via_suffix(client):
    r = client.completions.create(model="tiny", prompt="def add(a, b):\n    ", suffix="\n\nprint(add(1, 2))",
                                  max_tokens=8, temperature=0)
    plain = client.completions.create(model="tiny", prompt="def add(a, b):\n    ", max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens  # the suffix is part of the canvas
    assert r.choices[0].finish_reason in ("stop", "length")


def test_mercury_fim_with_httpx(srv, client):
    body = {"model": "tiny", "prompt": "def add(a, b):\n    return ", "suffix": "\n\nprint(add(2, 3))",
            "max_tokens": 8, "temperature": 0}
    r = httpx.post(srv.url + "/v1/fim/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    j = r.json()
    assert j["object"] == "text_completion" and j["id"].startswith("cmpl-")
    assert j["choices"][0]["finish_reason"] in ("stop", "length")
    assert set(j["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    same = client.completions.create(**body)
    assert j["choices"][0]["text"] == same.choices[0].text


def _sse(r: httpx.Response) -> list:
    out = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            out.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
    return out


def test_diffusing_stream_shows_the_canvas(srv, client):
    body = {"prompt": "print(", "max_tokens": 16, "temperature": 0, "stream": True, "diffusing": True,
            "policy": "threshold", "threshold": 0.6}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    canvases = [c["choices"][0]["canvas"] for c in chunks]
    assert len(canvases) == chunks[-1]["stats"]["nfe"]  # one canvas per forward
    seen: set[int] = set()
    for i, cv in enumerate(canvases):
        assert cv["step"] == i + 1 and len(cv["tokens"]) == 16
        assert cv["masked"] == sum(t is None for t in cv["tokens"])
        assert cv["text"].count("\u2591") >= cv["masked"]
        new = set(cv["committed"])
        assert new and not new & seen  # each position is committed exactly once, never re-masked
        seen |= new
        assert all((cv["tokens"][p] is None) == (p not in seen) for p in range(16))
    assert seen == set(range(16)) and canvases[-1]["masked"] == 0
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text == client.completions.create(model="tiny", prompt="print(", max_tokens=16, temperature=0,
                                             extra_body={"policy": "threshold", "threshold": 0.6}).choices[0].text


BAD = [
    ("malformed JSON", b'{"prompt": "x",', None),
    ("not an object", b"[1, 2]", None),
    ("wrong type", {"prompt": "x", "max_tokens": "8"}, "max_tokens"),
    ("bool for int", {"prompt": "x", "max_tokens": True}, "max_tokens"),
    ("unknown field", {"prompt": "x", "max_tokenz": 8}, "max_tokenz"),
    ("max_tokens zero", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", {"prompt": "x", "max_tokens": -3}, "max_tokens"),
    ("max_tokens over limit", {"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
    ("prompt over context", {"prompt": "def add(a, b): return a + b " * 40, "max_tokens": 4}, "prompt"),
    ("unknown model", {"prompt": "x", "model": "gpt-5"}, "model"),
    ("n > 1", {"prompt": "x", "n": 2}, "n"),
    ("unknown policy", {"prompt": "x", "policy": "greedy"}, "policy"),
    ("threshold above 1", {"prompt": "x", "policy": "threshold", "threshold": 1.5}, "threshold"),
    ("threshold zero", {"prompt": "x", "policy": "margin", "threshold": 0}, "threshold"),
    ("unknown fallback", {"prompt": "x", "policy": "threshold", "fallback": "left"}, "fallback"),
    ("negative temperature", {"prompt": "x", "temperature": -1}, "temperature"),
    ("top_p zero", {"prompt": "x", "top_p": 0}, "top_p"),
    ("token id out of vocab", {"prompt": [10**6]}, "prompt"),
    ("two prompts", {"prompt": ["a", "b"]}, "prompt"),
    ("empty stop", {"prompt": "x", "stop": [""]}, "stop"),
    ("diffusing without stream", {"prompt": "x", "diffusing": True}, "diffusing"),
    ("logprobs", {"prompt": "x", "logprobs": 2}, "logprobs"),
    ("missing prompt", {"max_tokens": 3}, "prompt"),
]


@pytest.mark.parametrize("name,body,param", BAD, ids=[b[0] for b in BAD])
def test_bad_completion_requests_are_400(srv, name, body, param):
    kw = {"json": body}
    if isinstance(body, bytes):
        kw = {"content": body, "headers": {"content-type": "application/json"}}
    r = httpx.post(srv.url + "/v1/completions", timeout=30, **kw)
    assert r.status_code == 400, (name, r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["message"] and err["param"] == param, err


@pytest.mark.parametrize("body", [
    {"messages": []},
    {"messages": [{"role": "robot", "content": "x"}]},
    {"messages": [{"role": "user", "content": 3}]},
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
    {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
])
def test_bad_chat_requests_are_400(srv, body):
    r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=8, extra_body={"policy": "nope"})
    assert e.value.status_code == 400 and "policy" in str(e.value)


def test_unknown_route_and_method(srv):
    r = httpx.get(srv.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(srv.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_body_size_limit(srv):
    big = {"prompt": "x" * (2 << 20)}
    r = httpx.post(srv.url + "/v1/completions", json=big, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no content-length: the limit is counted as the body arrives
        for _ in range(40):
            yield b"x" * 65536
    r = httpx.post(srv.url + "/v1/completions", content=chunks(), timeout=30)
    assert r.status_code == 413


def test_metrics(srv, client):
    client.completions.create(model="tiny", prompt="x = ", max_tokens=8)
    text = httpx.get(srv.url + "/metrics").text
    for name in ("unmask_queue_depth", "unmask_running_requests", "unmask_completion_tokens_total",
                 "unmask_forward_passes_total", "unmask_tokens_per_forward_bucket",
                 "unmask_request_latency_seconds_bucket", "unmask_time_to_first_token_seconds_bucket",
                 'unmask_http_responses_total{endpoint="/v1/completions",status="200"}'):
        assert name in text, name


def test_lookahead_metrics(srv):
    """One token per step: every block ends on a step with one open position, which carries a lookahead
    row; the counters say how many ran and how many saved a forward."""
    def value(name):
        line = next(x for x in httpx.get(srv.url + "/metrics").text.splitlines() if x.startswith(name + " "))
        return float(line.split()[1])

    rows0, hits0, nfe0 = value("unmask_lookahead_rows_total"), value("unmask_lookahead_hits_total"), \
        value("unmask_forward_passes_total")
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "def f(", "max_tokens": 24, "steps": 24,
                                                        "policy": "topk", "temperature": 0}, timeout=30).json()
    rows, hits = value("unmask_lookahead_rows_total") - rows0, value("unmask_lookahead_hits_total") - hits0
    tokens, nfe = r["usage"]["completion_tokens"], value("unmask_forward_passes_total") - nfe0
    assert rows >= 1 and 0 <= hits <= rows
    assert nfe == tokens - hits  # topk, one token per step: a forward saved per hit


def test_playground_is_served(srv):
    r = httpx.get(srv.url + "/")
    assert r.status_code == 200 and "unmask playground" in r.text
    assert httpx.get(srv.url + "/static/app.js").status_code == 200
