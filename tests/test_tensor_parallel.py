"""Tensor-parallel serving with 2 gloo ranks on the CPU (engine/tensor_parallel.py): the split model's
logits equal one process's within fp32 tolerance, and the engine driven from rank 0 writes exactly one
process's tokens at temperature 0, for a block model and full-attention families (with GQA and q/k/v
biases); `unmask serve --tensor-parallel 2` starts its own ranks and answers as one process does;
a world size that cannot split the heads is one line and exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from unmask.families.tiny import write_tiny

pytestmark = pytest.mark.timeout(600)
HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "fixtures" / "families"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_split(model_dir: Path, out: Path, cache: str = "auto") -> dict:
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(HERE / "tp_run.py"), str(model_dir), str(out), cache],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def check(res: dict, heads: int, kv_heads: int) -> None:
    assert res["world"] == 2
    assert res["local_heads"] == [heads // 2, kv_heads // 2]  # each rank holds half the heads
    assert res["cache_heads"] in (None, kv_heads // 2)  # and half of the KV cache
    assert res["max_abs_diff"] <= 1e-5 * max(1.0, res["max_abs_logit"]) * 10, res
    assert res["tokens"] == res["ref_tokens"]
    assert res["steps"] > 0 and all(len(t) == 24 for t in res["tokens"])


@pytest.mark.parametrize("family,cache", [("unmask", "auto"), ("llada", "auto"), ("llada", "none"), ("Dream", "auto")])
def test_split_model_equals_one_process(tmp_path, family, cache):
    _, net = write_tiny(family, tmp_path / family)
    check(run_split(tmp_path / family, tmp_path / "out.json", cache), net.config.n_heads, net.config.kv_heads)


@pytest.mark.skipif(not (SHARED / "llada-tiny").is_dir(), reason="needs ../shared (family fixtures)")
def test_family_fixture_split(tmp_path):
    from unmask.families.load import read_config

    raw, spec = read_config(SHARED / "llada-tiny")
    cfg = spec.config_from_hf(raw, SHARED / "llada-tiny")
    check(run_split(SHARED / "llada-tiny", tmp_path / "out.json"), cfg.n_heads, cfg.kv_heads)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: Path, port: int, *extra):
    proc = subprocess.Popen([sys.executable, "-m", "unmask", "serve", "--model", str(model), "--port", str(port),
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read()[-3000:])
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not start")


def test_serve_tensor_parallel_answers_as_one_process(tmp_path):
    write_tiny("Dream", tmp_path / "m")
    body = {"prompt": "def add(a, b):\n", "max_tokens": 16, "temperature": 0}
    texts = []
    for extra in ([], ["--tensor-parallel", "2"]):
        proc, url = _serve(tmp_path / "m", free_port(), *extra)
        try:
            r = httpx.post(url + "/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
        finally:
            proc.send_signal(2)  # SIGINT: rank 0 drains, then releases the other rank
            assert proc.wait(timeout=60) in (0, 130), proc.stderr.read()[-2000:]  # 130: uvicorn re-raises SIGINT
    assert texts[0] == texts[1] and texts[0]


@pytest.mark.parametrize("family,n,words", [("unmask", 3, "4 attention heads do not split evenly over 3 ranks"),
                                            ("llada2_moe", 2, "mixture-of-experts")])
def test_world_size_that_cannot_split_is_one_line(tmp_path, family, n, words):
    write_tiny(family, tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "unmask", "serve", "--model", str(tmp_path / "m"), "--port", "0",
                        "--tensor-parallel", str(n)], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and f"--tensor-parallel {n}" in lines[0], r.stderr


def test_options_that_cannot_apply_are_refused(tmp_path):
    write_tiny("unmask", tmp_path / "m")
    r = subprocess.run([sys.executable, "-m", "unmask", "serve", "--model", str(tmp_path / "m"), "--port", "0",
                        "--tensor-parallel", "2", "--quantize", "int8wo"], capture_output=True, text=True, env=ENV,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "unmask: error: --tensor-parallel runs the plain torch forward: drop --quantize"], r.stderr
