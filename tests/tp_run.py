"""Run under torchrun by tests/test_tensor_parallel.py: one model, one process's logits and engine
tokens on rank 0, then the same model split over every rank (engine/tensor_parallel.py) and the same
forward and requests again. Rank 0 writes what it saw to the JSON file given."""
from __future__ import annotations

import json
import sys

import torch

from unmask.engine import Engine, SamplingParams, tensor_parallel
from unmask.pretrained import load
from unmask.train import distributed

PROMPTS = ["def add(a, b):\n", "class Stack:\n    def push(self, x):", "import os\n", "x = [1, 2,"]


def main(model_dir: str, out: str, cache: str = "auto") -> None:
    torch.set_num_threads(1)
    d = distributed.init()
    model = load(model_dir)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    ids[:, 12:] = cfg.mask_token_id if cfg.mask_token_id is not None else ids[:, 12:]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    with torch.inference_mode():
        ref = model.net(ids)
    ref_tokens = [o.token_ids for o in Engine(model, max_batch=4, cache=cache).generate(PROMPTS, params)] \
        if d.main else None
    tensor_parallel.shard(model.net, d.world, d.device)
    with torch.inference_mode():
        got = model.net(ids)  # every rank runs it: the row-parallel layers all-reduce
    if not d.main:
        tensor_parallel.worker(model)
        model = None
        distributed.leave()
        return
    engine = Engine(model, max_batch=4, cache=cache)
    tokens = [o.token_ids for o in engine.generate(PROMPTS, params)]
    steps = engine.core.steps
    engine.core.tp_driver.stop()
    local = model.net.layers[0].attn
    json.dump({"max_abs_diff": float((got - ref).abs().max()), "max_abs_logit": float(ref.abs().max()),
               "ref_tokens": ref_tokens, "tokens": tokens, "steps": steps, "world": d.world,
               "local_heads": [local.n_heads, local.n_kv], "cache_heads": engine.core.cache.k.shape[2]
               if engine.core.cache is not None else None}, open(out, "w"))
    model = engine = None
    distributed.leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
