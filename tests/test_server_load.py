"""Many clients at once: every answer must equal the same request run alone (temperature 0, where the
engine is batch-invariant), and bench/load.py must run end to end."""
from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import httpx
import pytest

from test_server_support import live, tiny, tiny_dir  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(180)
ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def add(", "class Stack", "for i in", "x = ", "print(", "return a", "def pop(self):", "items"]


def requests_32() -> list[tuple[str, dict]]:
    out = []
    for i in range(32):
        p = PROMPTS[i % len(PROMPTS)] + " " * (i // 8)
        extra = [{}, {"policy": "threshold", "threshold": 0.5}, {"policy": "topk", "steps": 6},
                 {"policy": "entropy", "threshold": 0.3}][i % 4]
        body = {"max_tokens": 6 + i % 11, "temperature": 0, **extra}
        if i % 5 == 0:
            out.append(("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": p}]}))
        elif i % 7 == 0:
            out.append(("/v1/fim/completions", {**body, "prompt": p, "suffix": "\n    return x\n"}))
        else:
            out.append(("/v1/completions", {**body, "prompt": p, "stream": i % 3 == 0}))
    return out


async def call(client: httpx.AsyncClient, path: str, body: dict) -> tuple[str, str, int]:
    if not body.get("stream"):
        r = await client.post(path, json=body)
        assert r.status_code == 200, r.text
        j = r.json()
        c = j["choices"][0]
        return c.get("text", c.get("message", {}).get("content")), c["finish_reason"], j["usage"]["completion_tokens"]
    text, reason, n = "", None, None
    async with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                text += chunk["choices"][0]["text"]
                reason = chunk["choices"][0]["finish_reason"] or reason
                n = chunk.get("usage", {}).get("completion_tokens", n)
    return text, reason, n


def test_32_concurrent_clients_match_solo_runs(tiny):  # noqa: F811
    reqs = requests_32()
    # a KV budget of one context makes the scheduler queue and preempt (dozens of times) as well as batch
    with live(tiny, max_batch=8, engine_options={"kv_budget_tokens": 64}) as s:
        async def solo():
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                return [await call(c, p, b) for p, b in reqs]

        async def together():
            limits = httpx.Limits(max_connections=32)
            async with httpx.AsyncClient(base_url=s.url, timeout=120, limits=limits) as c:
                return await asyncio.gather(*(call(c, p, b) for p, b in reqs))

        alone = asyncio.run(solo())
        engine, widths = s.state.engine, []
        step = engine.step
        engine.step = lambda: (widths.append(engine.num_running), step())[1]
        both = asyncio.run(together())
    assert max(widths) >= 3, "the concurrent requests were never batched together"
    assert len({a[0] for a in alone}) > 8, "the texts are too alike for this test to mean anything"
    for (path, body), a, b in zip(reqs, alone, both):
        assert a == b, (path, body)


def test_bench_load_script_runs(tiny, tmp_path, capsys):  # noqa: F811
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "load.json"
    with live(tiny, max_batch=4) as s:  # --url: no server process to start (the script's default)
        rc = mod.main(["--url", s.url, "--concurrency", "1,4", "--requests", "4", "--max-tokens", "8",
                       "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [lv["concurrency"] for lv in res["levels"]] == [1, 4]
    for lv in res["levels"]:
        assert lv["requests"] == 4 and lv["errors"] == 0
        assert lv["requests_per_s"] > 0 and lv["tokens_per_s"] > 0
        assert 0 < lv["p50_latency_s"] <= lv["p99_latency_s"]
    assert "req/s" in capsys.readouterr().out
