"""Engine eager vs torch.compile: tok/s at batch 1 and 4, and whether the outputs match.

    .venv/bin/python bench/compile_check.py [MODEL_DIR]      (default: models/unmask-coder-ar)

On the 2-core CPU (AR twin, 128 tokens, 1 thread) compile measured 299.3 -> 33.1 tok/s at batch 1 (outputs identical):
ragged batch and cache shapes keep recompiling, so Engine(compile=...) stays off by default.
"""
import sys
import time

import torch

import unmask

torch.set_num_threads(1)
model = unmask.load(sys.argv[1] if len(sys.argv) > 1 else "models/unmask-coder-ar")
prompts = ["def add(a, b):\n", "import os\n\ndef main():\n", "class Stack:\n    def __init__(self):\n", "def fib(n):\n"]
diffusion = {} if model.config.attention == "causal" else {"policy": "topk"}
texts = {}
for compiled in (False, True):
    engine = unmask.Engine(model, compile=compiled, max_batch=4)
    t0 = time.perf_counter()
    engine.generate(prompts[:1], unmask.SamplingParams(max_tokens=8, **diffusion))
    warm = time.perf_counter() - t0
    for bs in (1, 4):
        params = unmask.SamplingParams(max_tokens=128, **diffusion)
        t0 = time.perf_counter()
        outs = engine.generate(prompts[:bs], params)
        dt = time.perf_counter() - t0
        texts[compiled, bs] = [o.text for o in outs]
        print(f"compile={compiled!s:5} batch={bs}  warm-up {warm:5.1f} s  "
              f"{sum(o.completion_tokens for o in outs) / dt:7.1f} tok/s")
print("outputs identical:", all(texts[False, b] == texts[True, b] for b in (1, 4)))
