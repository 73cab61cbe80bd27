"""One peer engine behind a line protocol, run by bench/peers.py inside that peer's own venv.

    /tmp/peers/NAME/bin/python bench/peer_driver.py NAME VIEW_DIR --threads 2 --concurrency 16

VIEW_DIR is the checkpoint as the peer must see it (bench/peers.py makes it: symlinks to the files plus
bench/peers_llada/*.py, as the peers load LLaDA only through `trust_remote_code`). After loading it
prints `@@ {"ready": ...}`; then each stdin line is a JSON job {"prompts": [...], "concurrent": bool,
"tokens", "steps", "block"} and each answer one `@@ {...}` line: wall seconds, the forwards the model
ran (calls, and rows = calls x batch rows, counted by a forward pre-hook), and per request the prompt
and generated token ids. Everything else the peer prints goes to stderr.

- dfastllm: `DFastLLMEngine(DFastLLMConfig(...))`, `generate(prompt, SamplingParams)` one request at
  a time, `generate_async` x N with `max_concurrent` = N (a thread per request; no cross-request
  batching). APD, MoR and adaptive steps are turned off so that it runs plain LLaDA low-confidence
  remasking; its block length is fixed at min(32, max_tokens) in `_diffusion_generate`.
- dlmserve: `Engine(model_id=DIR, dtype="bf16", device="cpu", max_batch=N).generate(prompts,
  SamplingParams(...), prerendered=True)`. It hard-codes LLaDA-8B's mask id 126336 (and checks the
  tokenizer against it), so the driver sets that constant to the checkpoint's mask id; it loads only
  int4 (bitsandbytes, CUDA) or bf16, so the driver casts the loaded bf16 weights (exactly the stored
  ones) to fp32, as every engine in the row runs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time

import torch


def emit(obj) -> None:
    sys.__stdout__.write("@@ " + json.dumps(obj) + "\n")
    sys.__stdout__.flush()


class Counter:
    """Counts the model's forward calls and batch rows (thread-safe: dfastllm runs a thread per request)."""

    def __init__(self, model):
        self.calls = self.rows = 0
        self.lock = threading.Lock()
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        with self.lock:
            self.calls += 1
            self.rows += int(ids.shape[0])

    def take(self):
        with self.lock:
            out, self.calls, self.rows = (self.calls, self.rows), 0, 0
        return out


class DFastLLM:
    def __init__(self, path, job, concurrency):
        from dfastllm.config import DFastLLMConfig
        from dfastllm.engine import DFastLLMEngine
        cfg = DFastLLMConfig(model=path, trust_remote_code=True, dtype="float32", diffusion_steps=job["steps"],
                             block_size=job["block"], enable_apd=False, enable_mor=False, use_adaptive_steps=False,
                             compile_model=False, max_concurrent_requests=concurrency)
        self.engine = DFastLLMEngine(cfg, max_concurrent=concurrency)
        self.model = self.engine._model

    def run(self, job):
        from dfastllm.engine import SamplingParams
        if job["block"] != min(32, job["tokens"]) or job["steps"] != self.engine.config.diffusion_steps:
            raise ValueError("dfastllm fixes its block length at min(32, max_tokens) and takes steps at load")
        sp = SamplingParams(max_tokens=job["tokens"], temperature=0.0)
        if job["concurrent"]:
            async def all_():
                return await asyncio.gather(*[self.engine.generate_async(p, sp) for p in job["prompts"]])
            outs = asyncio.run(all_())
        else:
            outs = [self.engine.generate(p, sp) for p in job["prompts"]]
        res = []
        for o in outs:
            n = len(o.prompt_token_ids)
            res.append((o.prompt_token_ids, o.outputs[0].token_ids[n:]))
        return res


class DLMServe:
    def __init__(self, path, job, concurrency):
        import dlmserve.models.llada as llada
        from dlmserve.engine import Engine
        mask_id = json.load(open(f"{path}/config.json"))["mask_token_id"]
        llada.MASK_ID = mask_id  # dlmserve hard-codes LLaDA-8B's 126336
        self.engine = Engine(model_id=path, dtype="bf16", device="cpu", max_batch=concurrency)
        self.engine._loaded.mask_id = mask_id
        self.model = self.engine._loaded.model.float()

    def run(self, job):
        from dlmserve.sampler import SamplingParams
        sp = SamplingParams(num_denoising_steps=job["steps"], gen_length=job["tokens"], block_length=job["block"],
                            temperature=0.0)
        if job["concurrent"]:
            outs = self.engine.generate(job["prompts"], sp, prerendered=True)
        else:
            outs = [self.engine.generate([p], sp, prerendered=True)[0] for p in job["prompts"]]
        return [(o.prompt_ids.tolist(), o.output_ids.tolist()) for o in outs]


PEERS = {"dfastllm": DFastLLM, "dlmserve": DLMServe}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("peer", choices=sorted(PEERS))
    ap.add_argument("path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--job", required=True, help="JSON: the settings fixed at load (steps, block)")
    a = ap.parse_args()
    sys.stdout = sys.stderr  # the peer's own prints stay off the protocol
    torch.set_num_threads(a.threads)
    from importlib.metadata import version
    peer = PEERS[a.peer](a.path, json.loads(a.job), a.concurrency)
    counter = Counter(peer.model)
    emit({"ready": True, "version": version(a.peer), "torch": torch.__version__,
          "transformers": version("transformers"), "dtype": str(next(peer.model.parameters()).dtype)})
    for line in sys.stdin:
        job = json.loads(line)
        try:
            counter.take()
            t0 = time.perf_counter()
            res = peer.run(job)
            wall = time.perf_counter() - t0
            calls, rows = counter.take()
            emit({"wall_s": wall, "calls": calls, "rows": rows, "prompt_ids": [r[0] for r in res],
                  "gen_ids": [r[1] for r in res]})
        except Exception as e:  # reported, and the driver stays up for the next job
            emit({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
