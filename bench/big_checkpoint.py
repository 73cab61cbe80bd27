"""Load time and peak memory of a large checkpoint in a foreign layout, against its bytes on disk.

    .venv/bin/python bench/big_checkpoint.py --out /tmp/llada-1b [--layers 16 --d-model 2048 --mlp 5632]

Writes (once) a random-weight checkpoint in LLaDA's Hugging Face layout (OLMo-style names, bf16,
sharded with model.safetensors.index.json; the tokenizer of the project's tiny LLaDA checkpoint, whose
ids fit in the big vocabulary), then loads it with `unmask.load` in a fresh process per dtype and
reports seconds, the process's peak resident memory over its baseline (after imports), the weight
bytes at that dtype, and what is resident after loading, split into anonymous memory (the model's own
tensors) and file-backed pages (the memory-mapped shards: page cache the kernel may drop at will). A
loader that held a second private copy would show about twice the weights as anonymous memory.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARD_BYTES = 2 * 2**30


def write(out: Path, layers: int, d_model: int, heads: int, mlp: int, vocab: int) -> None:
    from unmask.config import ModelConfig
    from unmask.families import get
    from unmask.families.tiny import write_tiny
    from unmask.model import Transformer

    spec = get("llada")
    tiny_dir, tiny = write_tiny("llada", out)  # tokenizer files and ids; its weights are replaced below
    for f in out.glob("*.safetensors*"):
        f.unlink()
    small = tiny.config
    cfg = ModelConfig(**{**small.model_dump(), "d_model": d_model, "n_layers": layers, "n_heads": heads,
                         "n_kv_heads": None, "mlp_hidden": mlp, "vocab_size": vocab, "max_seq_len": 4096})
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    shard, size, n, weight_map = {}, 0, 0, {}

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, out / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size = {}, 0

    for ours, shape in shapes.items():
        t = torch.ones(shape) if ours.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
        (theirs, tensor), = spec.state_to_hf({ours: t.to(torch.bfloat16)}, cfg).items()
        nbytes = tensor.numel() * 2
        if size + nbytes > SHARD_BYTES:
            flush()
        shard[theirs], size = tensor, size + nbytes
    flush()
    total = sum(math.prod(s) * 2 for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(spec.config_to_hf(cfg), indent=2))


def measure(path: Path, dtype: str) -> dict:
    code = f"""
import json, resource, time, torch, unmask
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
m = unmask.load({str(path)!r}, dtype=torch.{dtype})
t1 = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
anon, file = (int(status[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile"))
params = sum(p.numel() * p.element_size() for p in m.net.parameters())
t2 = time.perf_counter(); m.logits([[1, 2, 3, 4, 5, 6, 7, 8]]); t3 = time.perf_counter()
print(json.dumps(dict(dtype={dtype!r}, seconds=t1 - t0, peak_over_baseline=(peak - base) * 1024,
                      weight_bytes=params, rss_anon=anon, rss_file=file, parameters=sum(p.numel() for p in m.net.parameters()),
                      forward_8_tokens_s=t3 - t2)))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--d-model", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--mlp", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=126464)
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    a = p.parse_args()
    if not (a.out / "config.json").exists():
        t0 = time.perf_counter()
        write(a.out, a.layers, a.d_model, a.heads, a.mlp, a.vocab)
        print(f"wrote {a.out} in {time.perf_counter() - t0:.0f} s")
    disk = sum(f.stat().st_size for f in a.out.glob("*.safetensors"))
    print(f"on disk: {disk / 2**30:.2f} GiB of safetensors")
    for dtype in a.dtypes:
        r = measure(a.out, dtype)
        print(f"{dtype:>8}: {r['parameters'] / 1e9:.2f}B parameters, load {r['seconds']:.1f} s, peak RSS over "
              f"baseline {r['peak_over_baseline'] / 2**30:.2f} GiB for {r['weight_bytes'] / 2**30:.2f} GiB of "
              f"weights ({r['peak_over_baseline'] / r['weight_bytes']:.2f}x); one 8-token forward "
              f"{r['forward_8_tokens_s']:.2f} s; after loading {r['rss_anon'] / 2**30:.2f} GiB anonymous + "
              f"{r['rss_file'] / 2**30:.2f} GiB file-backed (the memory-mapped shards, page cache)")


if __name__ == "__main__":
    main()
