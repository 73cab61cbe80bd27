"""int8 vs fp32: held-out bits per byte and engine tok/s at batch 1 and 16, for both embedded models.

Needs corpus/default (`unmask data build --out corpus/default`). Run: .venv/bin/python bench/int8_check.py
"""
import time, torch, unmask
from unmask.data import corpus_meta, load_split
from unmask.eval import bits_per_byte
from unmask.engine.quantize import quantize_model
meta = corpus_meta("corpus/default"); s = meta["splits"]["val"]; val = load_split("corpus/default", "val")
prompts = ["def add(a, b):", "import os\nimport sys\n", "class Stack:\n    def __init__(self):\n", "for i in range(10):\n"] * 4
for name in ("models/unmask-coder", "models/unmask-coder-ar"):
    m = unmask.load(name)
    for q in (None, "int8"):
        mm = m if q is None else quantize_model(m, q)
        bpb = bits_per_byte(mm.net, val, s["bytes"] / s["tokens"], seq_len=256, batch=8, n_batches=32, seed=0)["bpb"]
        e = unmask.Engine(m, quantize=q)
        sp = unmask.SamplingParams(max_tokens=128, steps=32) if m.config.attention != "causal" else unmask.SamplingParams(max_tokens=128)
        e.generate(prompts[:1], sp)
        t = time.perf_counter(); o1 = e.generate(prompts[:1], sp); d1 = time.perf_counter() - t
        t = time.perf_counter(); o16 = e.generate(prompts, sp); d16 = time.perf_counter() - t
        print(f"{name:24s} {str(q):5s} bpb {bpb:.6f}  b1 {o1[0].completion_tokens/d1:7.1f} tok/s  b16 {sum(o.completion_tokens for o in o16)/d16:7.1f} tok/s")
