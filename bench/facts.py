r"""A fine-tune that provably teaches: synthetic key -> value facts the model cannot know, fine-tuned
with the command a user types, served, and every fact asked through the HTTP API.

    .venv/bin/python bench/facts.py --facts 200 --work runs/facts            # all weights
    .venv/bin/python bench/facts.py --facts 200 --work runs/facts-lora --lora

It writes the facts as a chat JSONL, runs `unmask finetune --data FILE --out DIR --val-frac 0
--epochs 8` (plus `--lora`; every other setting at its default), starts `unmask serve` on the result,
asks each question through /v1/chat/completions at temperature 0, and counts the answers that are
exactly the sentence it was taught. One JSON line with the figures goes to stdout (and --json).
tests/test_facts.py runs the same experiment at test size.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def make_facts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (question, answer) pairs: a made-up unit name and a 4-digit access code, all distinct."""
    rng = random.Random(seed)
    units, out = set(), []
    while len(out) < n:
        unit = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2)) + str(rng.randrange(100, 1000))
        if unit in units:
            continue
        units.add(unit)
        code = str(rng.randrange(1000, 10000))
        out.append((f"What is the access code of unit {unit}?", f"The access code of unit {unit} is {code}."))
    return out


def write_jsonl(facts, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for q, a in facts:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ask_all(model_dir: Path, facts, concurrency: int = 16) -> list[str]:
    """Serve model_dir with `unmask serve` and ask every question; the answers in order."""
    import concurrent.futures

    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unmask", "serve", "--model", str(model_dir), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"unmask serve exited: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)

        def ask(q: str) -> str:
            r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
                "messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 32})
            r.raise_for_status()
            return r.json()["choices"][0]["message"]["content"]

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            return list(pool.map(ask, [q for q, _ in facts]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run(n: int, work: Path, lora: bool = False, model: str | None = None, extra: list[str] = (), seed: int = 0) -> dict:
    facts = make_facts(n, seed)
    data, out = work / "facts.jsonl", work / "model"
    write_jsonl(facts, data)
    cmd = [sys.executable, "-m", "unmask", "finetune", "--data", str(data), "--out", str(out), "--val-frac", "0",
           "--epochs", "8", *(["--lora"] if lora else []), *(["--model", model] if model else []), *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    answers = ask_all(out, facts)
    ask_s = time.perf_counter() - t1
    exact = sum(a.strip() == want for a, (_, want) in zip(answers, facts))
    ft = json.loads((out / "finetune.json").read_text())
    wrong = [(q, a) for a, (q, want) in zip(answers, facts) if a.strip() != want][:5]
    return {"facts": n, "lora": lora, "exact": exact, "accuracy": exact / n, "finetune_seconds": round(train_s, 1),
            "ask_seconds": round(ask_s, 1), "steps": ft["steps"], "final_loss": ft["history"][-1]["loss"],
            "lr": ft["config"]["lr"] or None, "command": " ".join(cmd[1:]), "wrong_examples": wrong}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=200)
    ap.add_argument("--work", default="runs/facts")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--model", default=None, help="base model (default: the embedded one)")
    ap.add_argument("--json", default=None, help="also append the result line here")
    ap.add_argument("extra", nargs="*", help="more `unmask finetune` arguments (after --)")
    a = ap.parse_args()
    work = Path(a.work)
    if (work / "model").exists():
        import shutil
        shutil.rmtree(work / "model")
    res = run(a.facts, work, a.lora, a.model, a.extra)
    line = json.dumps(res)
    print(line)
    if a.json:
        with open(a.json, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
