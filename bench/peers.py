"""unmask against the open dLLM engines on PyPI that load a LLaDA-layout checkpoint, on one checkpoint
with one decoding setting: tok/s, NFE (forwards per request) and TPF (tokens per forward), at batch 1
and at N concurrent requests, in interleaved rounds.

    .venv/bin/python bench/llada_ckpt.py /tmp/llada-bench          # a random 51.7M-parameter LLaDA
    .venv/bin/python bench/peers.py --model /tmp/llada-bench [--peers dfastllm dlmserve] [--rounds 3]
                                    [--json bench/results/peers.json]

Each peer runs in its own venv (`--venvs`/NAME/bin/python; made with `python3 -m venv`, then
`pip install torch==2.13.0`, then `pip install NAME`) through bench/peer_driver.py, a long-lived
subprocess that loads the model once and answers one job per line; unmask runs in this process.
The peers load LLaDA only via `trust_remote_code` (the checkpoint's own modeling_llada.py, which our
checkpoints lack), so they get a temporary view of --model (its files symlinked, named `llada-*`,
since dfastllm picks its diffusion path by the name) plus bench/peers_llada/*.py, written for this
benchmark and checked against the LLaDA reference logits of shared/fixtures/families/llada-tiny.

Decoding, the same on every side: greedy, --tokens per request, semi-autoregressive blocks of --block,
--steps low-confidence top-k steps in all (--tokens / --steps committed per forward; neither peer has a
confidence-threshold rule for LLaDA). The 16 short code prompts each get a leading comment line sized so
that their token count is a multiple of --block, where unmask's blocks (absolute multiples of the block
size) and LLaDA's (from the prompt's end) are the same partition. Every request runs to --tokens (the
peers have no early stop; llada_ckpt.py zeroes the EOS head rows so unmask does not stop either).
dlmserve hard-codes LLaDA-8B's mask id and loads only int4/bf16 (see peer_driver.py for the two
shims); every side runs the same fp32 weights. The unmask sides: `unmask`
(cache=auto: Fast-dLLM's approximate dual cache for full attention) and `unmask-nocache` (the whole
canvas every forward, as the peers do). Batch 1: --b1-prompts requests one after another. Concurrent:
--concurrency requests submitted together (unmask: one Engine.generate; dlmserve: one
Engine.generate, batched by its scheduler; dfastllm: generate_async per request, a thread each).
Each round runs every side once in each mode, in the order A, B, C, then C, B, A the next round, so a
drift of the machine's speed falls on all sides alike; tok/s is the median over rounds. `same` is the
share of generated tokens equal to the reference side's (dlmserve, else unmask-nocache): the sides
that run the exact algorithm should agree up to float rounding; the dual cache is approximate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import unmask

HERE = Path(__file__).resolve().parent
PROMPTS = [
    "def add(a, b):", "import os", "class Stack:", "def fibonacci(n):", "for i in range(10):",
    "def is_prime(n):", "with open(path) as f:", "def merge_sort(xs):", "import json", "def main():",
    "class Point:", "def reverse(s):", "try:", "def mean(values):", "from typing import List", "def gcd(a, b):",
]


def align(tok, prompts: list[str], block: int) -> list[str]:
    """Each prompt behind a comment line of dashes sized so that its token count is a multiple of
    `block`: unmask cuts blocks at absolute multiples of the block size, LLaDA's sampler (both peers)
    at the prompt's end plus multiples, and the two partitions coincide only there."""
    out = []
    for p in prompts:
        fits = (f"# {fill * n}\n{p}" for fill in ("-", " -", "x") for n in range(8 * block))
        out.append(next((s for s in fits if len(tok.encode(s, add_special_tokens=False).ids) % block == 0), None))
        if out[-1] is None:
            raise SystemExit(f"no padding of {p!r} makes its token count a multiple of {block}")
    return out


class Peer:
    """A peer engine in its own venv, behind bench/peer_driver.py."""

    def __init__(self, name: str, python: Path, view: Path, args, tmp: Path):
        self.name, self.log = name, tmp / f"{name}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp / "hf_modules"),
                   OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
        job = json.dumps({"steps": args.steps, "block": args.block})
        self.proc = subprocess.Popen(
            [str(python), str(HERE / "peer_driver.py"), name, str(view), "--threads", str(args.threads),
             "--concurrency", str(args.concurrency), "--job", job],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"), text=True, env=env)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@ "):
                return json.loads(line[3:])
        tail = self.log.read_text()[-2000:]
        raise RuntimeError(f"{self.name} driver exited ({self.proc.wait()}); its log ends:\n{tail}")

    def run(self, prompts: list[str], concurrent: bool, args) -> dict:
        job = {"prompts": prompts, "concurrent": concurrent, "tokens": args.tokens, "steps": args.steps,
               "block": args.block}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        r = self._read()
        if "error" in r:
            raise RuntimeError(f"{self.name}: {r['error']}")
        return {"wall_s": r["wall_s"], "tokens": sum(len(g) for g in r["gen_ids"]), "rows": r["rows"],
                "calls": r["calls"], "requests": len(prompts), "gen_ids": r["gen_ids"], "prompt_ids": r["prompt_ids"]}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


class Unmask:
    """unmask in this process, with token-id prompts (the same ids the peers' tokenizers produce)."""

    def __init__(self, name: str, model, cache: str, ids: dict, args):
        self.name, self.ids = name, ids
        self.info = {"version": getattr(unmask, "__version__", "dev"), "cache": cache, "torch": torch.__version__}
        self.engine = unmask.Engine(model, max_batch=max(16, args.concurrency), cache=cache)
        self.params = unmask.SamplingParams(max_tokens=args.tokens, policy="topk", steps=args.steps,
                                            block_size=args.block, temperature=0.0, heal=False)

    def run(self, prompts: list[str], concurrent: bool, args) -> dict:
        ids = [self.ids[p] for p in prompts]
        t0 = time.perf_counter()
        outs = self.engine.generate(ids, self.params) if concurrent else \
            [self.engine.generate([i], self.params)[0] for i in ids]
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "tokens": sum(o.completion_tokens for o in outs), "rows": sum(o.nfe for o in outs),
                "calls": None, "requests": len(prompts), "gen_ids": [list(o.token_ids) for o in outs],
                "prompt_ids": ids if all(o.prompt_tokens == len(i) for o, i in zip(outs, ids)) else None}

    def close(self) -> None:
        pass


def make_view(model: Path, tmp: Path) -> Path:
    """The checkpoint as the peers load it: its files symlinked plus our LLaDA modeling code."""
    view = tmp / f"llada-{model.name}"
    view.mkdir()
    for f in model.iterdir():
        if f.suffix != ".py":
            (view / f.name).symlink_to(f.resolve())
    for f in (HERE / "peers_llada").glob("*.py"):
        (view / f.name).write_text(f.read_text())
    return view


def summarise(runs: list[dict], ref: list[dict] | None) -> dict:
    rates = [r["tokens"] / r["wall_s"] for r in runs]
    last = runs[-1]
    out = {"tok_s": statistics.median(rates), "tok_s_rounds": [round(x, 2) for x in rates],
           "tokens_per_request": last["tokens"] / last["requests"], "nfe": last["rows"] / last["requests"],
           "tpf": last["tokens"] / last["rows"] if last["rows"] else None,
           "batched_forwards": last["calls"], "wall_s_rounds": [round(r["wall_s"], 2) for r in runs]}
    if ref is not None:
        pairs = [(a, b) for x, y in zip(last["gen_ids"], ref[-1]["gen_ids"]) for a, b in zip(x, y)]
        out["same"] = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="a LLaDA-layout checkpoint directory (bench/llada_ckpt.py)")
    ap.add_argument("--peers", nargs="*", default=["dfastllm", "dlmserve"])
    ap.add_argument("--venvs", default="/tmp/peers", help="holds NAME/bin/python for each peer")
    ap.add_argument("--unmask-cache", nargs="*", default=["auto", "none"], help="unmask sides: Engine(cache=...)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--b1-prompts", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model).resolve()
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = align(tok, PROMPTS, args.block)
    conc = [prompts[i % len(prompts)] for i in range(args.concurrency)]
    modes = {"batch1": (prompts[:args.b1_prompts], False), f"concurrent{args.concurrency}": (conc, True)}
    model = unmask.load(model_dir)
    load_start = os.getloadavg()
    ids = {p: tok.encode(p, add_special_tokens=False).ids for p in prompts}
    sides, errors = [], {}
    for cache in args.unmask_cache:
        name = "unmask" if cache == "auto" else f"unmask-{'nocache' if cache == 'none' else cache}"
        sides.append(Unmask(name, model, cache, ids, args))
    with tempfile.TemporaryDirectory(prefix="unmask-peers-") as t:
        tmp = Path(t)
        view = make_view(model_dir, tmp) if args.peers else None
        for name in args.peers:
            python = Path(args.venvs) / name / "bin" / "python"
            try:
                sides.append(Peer(name, python, view, args, tmp))
                print(f"{name} ready: {sides[-1].info}", flush=True)
            except (OSError, RuntimeError) as e:
                errors[name] = str(e)
                print(f"{name}: not run: {e}", file=sys.stderr, flush=True)
        for s in sides:  # warm-up: first-call allocations and lazy imports stay out of the timings
            s.run(prompts[:1], False, args)
        runs = {s.name: {m: [] for m in modes} for s in sides}
        for rnd in range(args.rounds):
            order = sides if rnd % 2 == 0 else sides[::-1]
            for s in order:
                for m, (ps, concurrent) in modes.items():
                    r = s.run(ps, concurrent, args)
                    runs[s.name][m].append(r)
                    print(f"round {rnd} {s.name:16s} {m:13s} {r['tokens'] / r['wall_s']:8.2f} tok/s "
                          f"({r['wall_s']:.1f} s)", flush=True)
        for s in sides:
            s.close()

    names = [s.name for s in sides]
    ref = "dlmserve" if "dlmserve" in names else ("unmask-nocache" if "unmask-nocache" in names else None)
    res = {s.name: {"info": s.info, **{m: summarise(runs[s.name][m], runs[ref][m] if ref else None)
                                       for m in modes}} for s in sides}
    for s in sides:  # every side must have seen the same prompt token ids
        for m in modes:
            p = runs[s.name][m][-1]["prompt_ids"]
            res[s.name][m]["prompt_ids_match"] = p == [ids[q] for q in modes[m][0]] if p else None
    base = res.get("unmask", res[names[0]]) if names else {}
    print(f"\n{'side':16s} {'mode':13s} {'tok/s':>9s} {'x unmask':>9s} {'NFE':>6s} {'TPF':>5s} {'same':>6s}")
    for name in names:
        for m in modes:
            r = res[name][m]
            same = f"{r['same']:.1%}" if "same" in r else "-"
            print(f"{name:16s} {m:13s} {r['tok_s']:9.2f} {r['tok_s'] / base[m]['tok_s']:9.2f} {r['nfe']:6.1f} "
                  f"{r['tpf'] or 0:5.2f} {same:>6s}")
    for name, e in errors.items():
        print(f"{name}: not run ({e.splitlines()[0]})")
    if args.json:
        out = {"schema": "unmask.bench.peers/1", "model": str(model_dir),
               "params": sum(p.numel() for p in model.net.parameters()),
               "settings": {k: getattr(args, k) for k in ("tokens", "block", "steps", "b1_prompts", "concurrency",
                                                          "rounds", "threads")},
               "reference_side": ref, "machine": {"cpu": platform.processor() or platform.machine(),
                                                  "cores": os.cpu_count(), "python": platform.python_version(),
                                                  "loadavg_start_end": [load_start, os.getloadavg()]},
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "sides": res, "not_run": errors}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
