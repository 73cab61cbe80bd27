"""Server robustness: API key, overload (429), timeouts, client disconnects (the slot and its cache
pages come back), engine failures, graceful shutdown, and `unmask serve` itself."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import httpx
import openai
import pytest

from test_server_support import live, slow_down, tiny, tiny_dir, wait_until  # noqa: F401  (fixtures)
from unmask.cli import main as cli_main
from unmask.engine import Engine
from unmask.server import LiveServer, ServerConfig, create_app

pytestmark = pytest.mark.timeout(120)
LONG = {"prompt": "def add(", "max_tokens": 48, "temperature": 0}  # 48 steps: long enough to interrupt


def idle(srv) -> bool:
    e = srv.state.engine
    return e.num_running == 0 and e.num_waiting == 0 and srv.state.pending == 0


def test_api_key(tiny):  # noqa: F811
    with live(tiny, api_key="sekret") as s:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/v1/completions", json={"prompt": 1})  # no validation details before auth
        assert r.status_code == 401
        assert httpx.get(s.url + "/metrics").status_code == 401
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(s.url + "/v1/models", headers={"x-api-key": "sekret"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        assert ok.completions.create(model="tiny", prompt="x", max_tokens=4).choices[0].finish_reason


def test_overload_is_429_with_retry_after(tiny):  # noqa: F811
    with live(tiny, max_batch=1, max_queue=0) as s:
        slow_down(s.state.engine, 0.02)
        first = {}
        t = threading.Thread(target=lambda: first.update(r=httpx.post(s.url + "/v1/completions", json=LONG,
                                                                      timeout=60)))
        t.start()
        assert wait_until(lambda: s.state.pending == 1)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).completions.create(
                model="tiny", prompt="x", max_tokens=4)
        t.join()
        assert first["r"].status_code == 200
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}).status_code == 200


def test_timeout(tiny):  # noqa: F811
    with live(tiny, request_timeout=0.3) as s:
        slow_down(s.state.engine, 0.02)
        r = httpx.post(s.url + "/v1/completions", json=LONG, timeout=30)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        with httpx.stream("POST", s.url + "/v1/completions", json={**LONG, "stream": True}, timeout=30) as r:
            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
        assert '"request_timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
        assert wait_until(lambda: idle(s)) and s.state.bridge.aborted == 2


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_cancels_and_frees_the_cache(tiny, stream):  # noqa: F811
    with live(tiny) as s:
        engine = s.state.engine
        free = engine.cache.free_pages
        slow_down(engine, 0.02)
        if stream:
            with httpx.stream("POST", s.url + "/v1/completions", json={**LONG, "stream": True, "diffusing": True},
                              timeout=30) as r:
                next(x for x in r.iter_lines() if x.startswith("data: "))
                assert engine.num_running == 1 and engine.cache.free_pages < free
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(s.url + "/v1/completions", json=LONG, timeout=0.3)
        assert wait_until(lambda: idle(s)), "the request kept running after its client left"
        assert s.state.bridge.aborted == 1
        assert engine.cache.free_pages == free
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4})
        assert r.status_code == 200


def test_engine_failure_is_500_and_the_server_lives_on(tiny):  # noqa: F811
    with live(tiny) as s:
        engine = s.state.engine
        step = engine.step
        engine.step = lambda: (_ for _ in ()).throw(RuntimeError("boom"))
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        engine.step = step
        assert httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4}).status_code == 200
        assert httpx.get(s.url + "/health").json()["status"] == "ok"


def test_graceful_shutdown_drains_requests_in_flight(tiny):  # noqa: F811
    engine = Engine(tiny, max_batch=4)
    app = create_app(tiny, ServerConfig(), engine)
    srv = LiveServer(app).start()
    slow_down(engine, 0.02)
    got = {}

    def client():
        with httpx.stream("POST", srv.url + "/v1/completions", json={**LONG, "stream": True}, timeout=60) as r:
            got["lines"] = [x for x in r.iter_lines() if x.startswith("data: ")]

    t = threading.Thread(target=client)
    t.start()
    assert wait_until(lambda: engine.num_running == 1)
    srv.stop()  # what SIGTERM does: stop accepting, finish what is running
    t.join(30)
    assert got["lines"][-1] == "data: [DONE]" and '"finish_reason": "length"' in got["lines"][-2]
    assert not app.state.unmask.bridge.alive and engine.num_running == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve(tiny_dir, capsys):  # noqa: F811
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "unmask.cli", "serve", "--model", str(tiny_dir), "--port", str(port)],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in p.stderr:
            lines.append(line)
            if "serving" in line or "Application startup complete" in line:
                break
        start = next(x for x in lines if "serving" in x)
        assert "tiny" in start and "cpu" in start and f"http://127.0.0.1:{port}" in start
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
        # the port is taken now: a second server is a user error, one line, exit 2
        assert cli_main(["serve", "--model", str(tiny_dir), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--port" in err[0] and str(port) in err[0]
        p.send_signal(signal.SIGTERM)
        rest = p.communicate(timeout=30)[1]
        assert "Shutting down" in rest or "Finished server process" in rest
        assert p.returncode in (0, -signal.SIGTERM)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
