"""unmask beside llama.cpp on this CPU: the AR twin exported to GGUF and served by llama.cpp's
`llama-server` at f32, f16 and q8_0, against unmask's dLLM and AR twin, in one interleaved run.

    .venv/bin/python bench/llamacpp.py --llama-cpp BIN_DIR        (llama-server, llama-bench in it)
    .venv/bin/python bench/llamacpp.py --build /tmp/lcpp          (build llama.cpp first, see below)
        [--prompts 8] [--tokens 256] [--threads 2] [--rounds 2] [--concurrency 16]
        [--dllm models/unmask-coder] [--ar models/unmask-coder-ar] [--json bench/results/llamacpp.json]

What it does, in order:
1. `--build DIR`: downloads the `llama-cpp-python` sdist (LLAMA_CPP_PYTHON, from PyPI) into DIR,
   and builds the llama.cpp it vendors (cmake + ninja, Release, CPU, native) into DIR/build/bin.
2. Writes the AR twin as GGUF at F32, F16 and Q8_0 (`unmask convert AR out.gguf`, the gguf package).
3. Starts one `llama-server` per GGUF (127.0.0.1, `--threads`, one slot) and checks that its greedy
   tokens equal unmask's AR twin at fp32 on every prompt (the same prompt token ids go to every
   system; no prompt cache on either side).
   Rows for unmask's own llama.cpp backend (Engine(backend="llama.cpp"), `--backend-weights`, default
   f32 and q8_0: the same dLLM and AR twin, the forward on llama.cpp's library through
   llama-cpp-python) have their greedy tokens checked against the same model on torch at fp32.
4. Times, at batch 1, every system on the same HumanEval prompts (spread over the 164), `--tokens`
   completion tokens each (or fewer at EOS), greedy, in `--rounds` interleaved rounds (the order
   reversed every other round): tok/s = completion tokens / wall seconds of the whole requests
   (prefill included, over HTTP for llama.cpp, in-process for unmask), and TPF.
5. `--concurrency N`: unmask's dLLM and AR twin with N requests in flight (aggregate tok/s), on
   torch at fp32 and on the llama.cpp backend at q8_0.
6. `llama-bench -n 128 -p 0` (tg128) per GGUF, llama.cpp's own kernel-only figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import torch

import unmask

LLAMA_CPP_PYTHON = "0.3.36"
QTYPES = ("F32", "F16", "Q8_0")


def log(msg: str) -> None:
    print(f"[llamacpp] {msg}", file=sys.stderr, flush=True)


# ---- building llama.cpp ---------------------------------------------------------------------------
def build(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    bin_dir = root / "build" / "bin"
    if (bin_dir / "llama-server").exists() and (bin_dir / "llama-bench").exists():
        return bin_dir
    sdists = sorted(root.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if not sdists:
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(root),
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
        sdists = sorted(root.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    src = root / "src"
    if not (src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}").exists():
        with tarfile.open(sdists[0]) as tf:
            tf.extractall(src, filter="data")
    cpp = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    log(f"building {cpp} (a few minutes on 2 cores)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(cpp), "-B", str(root / "build"), *gen, "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(root / "build"), "-j", str(os.cpu_count() or 2),
                    "--target", "llama-server", "llama-bench"], check=True)
    return bin_dir


# ---- llama-server ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, bin_dir: Path, gguf: Path, threads: int, ctx: int, log_path: Path):
        self.port = free_port()
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [str(bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
             "-t", str(threads), "-tb", str(threads), "-c", str(ctx), "-np", "1"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited; see {log_path}")
            time.sleep(0.5)
        raise RuntimeError(f"llama-server did not become healthy; see {log_path}")

    def complete(self, ids: list[int], n: int) -> tuple[list[int], float]:
        """Greedy tokens (a final end-of-generation token dropped, as unmask reports them) and seconds."""
        body = json.dumps({"prompt": ids, "n_predict": n, "temperature": 0.0, "cache_prompt": False,
                           "return_tokens": True, "stream": False}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        dt = time.perf_counter() - t0
        toks = out["tokens"]
        if toks and out.get("stop_type") == "eos":
            toks = toks[:-1]
        return toks, dt

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ---- the systems ----------------------------------------------------------------------------------
class UnmaskSystem:
    def __init__(self, model, quantize: str | None, max_batch: int, backend: str = "torch"):
        self.engine = unmask.Engine(model, max_batch=max_batch, quantize=quantize, backend=backend)

    def run(self, prompts: list[list[int]], n: int) -> tuple[list[list[int]], float, int]:
        """All prompts at once (the engine batches them up to max_batch); (tokens, seconds, nfe)."""
        t0 = time.perf_counter()
        outs = self.engine.generate(prompts, unmask.SamplingParams(max_tokens=n))
        return [o.token_ids for o in outs], time.perf_counter() - t0, sum(o.nfe for o in outs)


def humaneval_ids(tok, n: int) -> list[list[int]]:
    from unmask.eval import load_problems
    probs = load_problems()
    # Trailing whitespace stripped: the token ids go to every system as they are (no prompt healing on
    # either side), and a prompt ending in a bare newline token makes the AR twin stop at once.
    return [tok.encode(probs[i * len(probs) // n]["prompt"].rstrip()) for i in range(n)]


def llama_bench(bin_dir: Path, gguf: Path, threads: int) -> float | None:
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", "128",
                          "-r", "3", "-o", "json"], capture_output=True, text=True)
    if out.returncode != 0:
        log(f"llama-bench failed on {gguf.name}: {out.stderr.strip()[-300:]}")
        return None
    return float(json.loads(out.stdout)[0]["avg_ts"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", type=Path, help="directory with llama-server and llama-bench")
    ap.add_argument("--build", type=Path, help="build llama.cpp from the llama-cpp-python sdist under this directory")
    ap.add_argument("--dllm", default="models/unmask-coder")
    ap.add_argument("--ar", default="models/unmask-coder-ar")
    ap.add_argument("--work", type=Path, default=Path("runs/llamacpp"), help="GGUF files and server logs")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16, help="0: skip the concurrent rows")
    ap.add_argument("--quantize", nargs="*", default=["int8wo"], help="extra unmask weight formats to time")
    ap.add_argument("--backend-weights", nargs="*", default=["f32", "q8_0"],
                    help="weights of the rows on unmask's llama.cpp backend (none: skip those rows; skipped too "
                         "where llama-cpp-python is not installed)")
    ap.add_argument("--no-llama-bench", action="store_true")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    if (a.llama_cpp is None) == (a.build is None):
        ap.error("give --llama-cpp BIN_DIR or --build DIR")
    bin_dir = a.llama_cpp or build(a.build)
    torch.set_num_threads(a.threads)
    a.work.mkdir(parents=True, exist_ok=True)

    from unmask.convert import convert
    ggufs = {}
    for q in QTYPES:
        ggufs[q] = a.work / f"ar-{q.lower()}.gguf"
        if not ggufs[q].exists():
            log(f"writing {ggufs[q]}")
            convert(a.ar, ggufs[q], gguf_type=q)
    dllm, ar = unmask.load(a.dllm), unmask.load(a.ar)
    prompts = humaneval_ids(ar.tokenizer, a.prompts)
    if dllm.tokenizer.encode("def f(x):\n    return x") != ar.tokenizer.encode("def f(x):\n    return x"):
        raise SystemExit("the dLLM and the AR twin must share a tokenizer")
    ctx = max(len(p) for p in prompts) + a.tokens + 16

    systems = {"unmask dLLM fp32": UnmaskSystem(dllm, None, 1), "unmask AR fp32": UnmaskSystem(ar, None, 1)}
    for q in a.quantize:
        systems[f"unmask dLLM {q}"] = UnmaskSystem(dllm, q, 1)
        systems[f"unmask AR {q}"] = UnmaskSystem(ar, q, 1)
    from unmask.engine.llamacpp import available
    backend_weights = a.backend_weights if available() else []
    if a.backend_weights and not backend_weights:
        log("llama-cpp-python is not installed: no rows for unmask's llama.cpp backend (make venv installs it)")
    for w in backend_weights:
        systems[f"unmask dLLM llama.cpp {w}"] = UnmaskSystem(dllm, w, 1, "llama.cpp")
        systems[f"unmask AR llama.cpp {w}"] = UnmaskSystem(ar, w, 1, "llama.cpp")
    servers = {f"llama.cpp AR {q.lower()}": Server(bin_dir, g, a.threads, ctx, a.work / f"server-{q.lower()}.log")
               for q, g in ggufs.items()}
    try:
        # warm-up and the equality check against unmask's AR twin at fp32
        ref, _, _ = systems["unmask AR fp32"].run(prompts, a.tokens)
        equal = {}
        for name, s in servers.items():
            toks = [s.complete(p, a.tokens)[0] for p in prompts]
            same = [t == r[:len(t)] and len(t) == len(r) for t, r in zip(toks, ref)]
            first = [next((i for i, (x, y) in enumerate(zip(t, r)) if x != y), min(len(t), len(r)))
                     for t, r in zip(toks, ref)]
            equal[name] = {"prompts_equal": sum(same), "prompts": len(prompts), "first_difference": first}
            log(f"{name}: greedy tokens equal to unmask AR fp32 on {sum(same)}/{len(prompts)} prompts")
        dref, _, _ = systems["unmask dLLM fp32"].run(prompts, a.tokens)
        for name, s in systems.items():
            if "llama.cpp" in name:  # the backend's greedy tokens against the same model on torch at fp32
                toks, _, _ = s.run(prompts, a.tokens)
                r = dref if "dLLM" in name else ref
                same = sum(t == x for t, x in zip(toks, r))
                equal[name] = {"prompts_equal": same, "prompts": len(prompts),
                               "against": "unmask dLLM fp32" if "dLLM" in name else "unmask AR fp32"}
                log(f"{name}: greedy tokens equal to {equal[name]['against']} on {same}/{len(prompts)} prompts")
            s.run(prompts[:1], 16)
        rows = {name: {"tokens": 0, "seconds": 0.0, "nfe": 0} for name in [*systems, *servers]}
        order = list(rows)
        for rnd in range(a.rounds):
            for name in (order if rnd % 2 == 0 else order[::-1]):
                time.sleep(0.5)  # let the previous system's threads go idle
                row = rows[name]
                if name in systems:
                    for p in prompts:  # batch 1: one request at a time
                        toks, dt, nfe = systems[name].run([p], a.tokens)
                        row["tokens"] += len(toks[0])
                        row["seconds"] += dt
                        row["nfe"] += nfe
                else:
                    for p in prompts:
                        toks, dt = servers[name].complete(p, a.tokens)
                        row["tokens"] += len(toks)
                        row["seconds"] += dt
                        row["nfe"] += len(toks)
            log(f"round {rnd + 1}/{a.rounds} done")
    finally:
        for s in servers.values():
            s.close()
    result = {"machine": {"threads": a.threads, "cpu": _cpu()}, "workload": {
        "prompts": a.prompts, "tokens": a.tokens, "rounds": a.rounds}, "equal": equal, "batch1": {}}
    for name, r in rows.items():
        result["batch1"][name] = {"tok_s": r["tokens"] / r["seconds"], "tpf": r["tokens"] / max(r["nfe"], 1),
                                  "tokens": r["tokens"]}
    if a.concurrency:
        conc = {}
        many = (prompts * -(-a.concurrency // len(prompts)))[:a.concurrency]
        names = [("unmask dLLM fp32", None, "torch"), ("unmask AR fp32", None, "torch")]
        if "q8_0" in backend_weights:
            names += [("unmask dLLM llama.cpp q8_0", "q8_0", "llama.cpp"), ("unmask AR llama.cpp q8_0", "q8_0", "llama.cpp")]
        for name, q, backend in names:
            s = UnmaskSystem(dllm if "dLLM" in name else ar, q, a.concurrency, backend)
            s.run(many[:2], 16)
            toks, dt, nfe = s.run(many, a.tokens)
            n = sum(len(t) for t in toks)
            conc[name] = {"tok_s": n / dt, "tpf": n / max(nfe, 1)}
        result[f"concurrent{a.concurrency}"] = conc
    if not a.no_llama_bench:
        result["llama_bench_tg128"] = {q.lower(): llama_bench(bin_dir, g, a.threads) for q, g in ggufs.items()}
    report(result)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def report(res: dict) -> None:
    b1 = res["batch1"]
    fastest = max((v["tok_s"], k) for k, v in b1.items() if k.startswith("llama.cpp"))
    print(f"\nbatch 1, {res['workload']['prompts']} HumanEval prompts x {res['workload']['tokens']} tokens, greedy, "
          f"{res['machine']['threads']} threads, {res['workload']['rounds']} interleaved rounds")
    print(f"{'system':24s} {'tok/s':>8s} {'TPF':>6s} {'x fastest llama.cpp':>20s}")
    for k, v in b1.items():
        print(f"{k:24s} {v['tok_s']:8.1f} {v['tpf']:6.2f} {v['tok_s'] / fastest[0]:20.2f}")
    pairs = [("unmask AR fp32", "llama.cpp AR f32"), ("unmask AR int8wo", "llama.cpp AR q8_0")]
    pairs += [(f"unmask AR llama.cpp {w}", f"llama.cpp AR {w}") for w in ("f32", "f16", "q8_0")]
    for ours, theirs in pairs:
        if ours in b1 and theirs in b1:
            print(f"{ours} / {theirs}: x{b1[ours]['tok_s'] / b1[theirs]['tok_s']:.2f}")
    for k, v in res.get("equal", {}).items():
        print(f"{k}: greedy tokens equal to {v.get('against', 'unmask AR fp32')} on {v['prompts_equal']}/{v['prompts']} "
              f"prompts")
    for key in [k for k in res if k.startswith("concurrent")]:
        c = res[key]
        line = ", ".join(f"{k} {v['tok_s']:.1f} tok/s (TPF {v['tpf']:.2f})" for k, v in c.items())
        for tag in ("fp32", "llama.cpp q8_0"):
            d, r = c.get(f"unmask dLLM {tag}"), c.get(f"unmask AR {tag}")
            if d and r:
                line += f"; dLLM / AR ({tag}) x{d['tok_s'] / r['tok_s']:.2f}"
        print(f"{key}: {line}")
    if "llama_bench_tg128" in res:
        print("llama-bench tg128 tok/s: " + ", ".join(f"{k} {v:.1f}" for k, v in res["llama_bench_tg128"].items() if v))


if __name__ == "__main__":
    main()
