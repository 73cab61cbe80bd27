"""Load test for `unmask serve`: requests/s, tok/s and p50/p99 latency at several concurrencies.

    .venv/bin/python bench/load.py                      # starts `unmask serve` on the embedded model
    .venv/bin/python bench/load.py --model DIR --max-tokens 32
    .venv/bin/python bench/load.py --url http://127.0.0.1:8000 --api-key KEY
    .venv/bin/python bench/load.py --json bench/results/load.json

Each level runs `--requests` (default 4 x concurrency, at least 8) non-streaming completions from
`concurrency` clients in closed loop, on a fixed set of code prompts at temperature 0, after one
warm-up request. Latency is measured at the client, end to end. The server runs in its own
process, so the clients here do not compete with it for the GIL.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "def is_prime(n):",
           "import os\n\ndef list_files(path):", "def reverse(s: str) -> str:", "def merge_sort(xs):",
           "def parse_args(argv):", "class LRUCache:\n    def get(self, key):"]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


async def run_level(url: str, headers: dict, concurrency: int, n: int, body: dict) -> dict:
    todo = list(range(n))
    lat, toks, errors = [], 0, 0

    async def worker(client: httpx.AsyncClient):
        nonlocal toks, errors
        while todo:
            i = todo.pop()
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json={**body, "prompt": PROMPTS[i % len(PROMPTS)]})
            if r.status_code != 200:
                errors += 1
                continue
            lat.append(time.perf_counter() - t0)
            toks += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "seconds": round(wall, 3),
            "requests_per_s": round(len(lat) / wall, 3), "tokens_per_s": round(toks / wall, 1),
            "p50_latency_s": round(statistics.median(lat), 4) if lat else None,
            "p99_latency_s": round(percentile(lat, 99), 4) if lat else None}


async def bench(url: str, api_key: str | None, levels: list[int], requests: int | None, body: dict) -> list[dict]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as c:
        (await c.post("/v1/completions", json={**body, "prompt": PROMPTS[0]})).raise_for_status()  # warm-up
    out = []
    for c in levels:
        n = requests or max(8, 4 * c)
        out.append(await run_level(url, headers, c, n, body))
        r = out[-1]
        print(f"concurrency {c:>3}: {r['requests_per_s']:8.2f} req/s  {r['tokens_per_s']:9.1f} tok/s  "
              f"p50 {r['p50_latency_s']:.3f} s  p99 {r['p99_latency_s']:.3f} s  ({r['requests']} requests, "
              f"{r['errors']} errors)", flush=True)
    return out


def start_server(model: str | None, max_batch: int, max_queue: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "unmask.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--max-queue", str(max_queue)] + (["--model", model] if model else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while time.monotonic() - t0 < 300:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}; run `{' '.join(cmd)}` to see why")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start within 300 s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server (default: start one in this process)")
    p.add_argument("--model", default=None, help="model directory for the in-process server (default: embedded)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: 4 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--policy", default=None)
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--max-batch", type=int, default=32, help="engine batch of the in-process server")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",") if x]
    body = {"max_tokens": a.max_tokens, "temperature": 0}
    if a.policy:
        body["policy"] = a.policy
    if a.threshold is not None:
        body["threshold"] = a.threshold
    proc, url = None, a.url
    if url is None:
        proc, url = start_server(a.model, a.max_batch, max(levels) * 2)
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    meta = {"url": url, "max_batch": a.max_batch if proc else None,
            "model": httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"][0],
            "device": httpx.get(url + "/health", timeout=30).json().get("device")}
    try:
        results = asyncio.run(bench(url, a.api_key, levels, a.requests, body))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({**meta, "request": body, "levels": results}, indent=2))
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
