"""A random LLaDA-layout checkpoint of a chosen size, for speed benchmarks (bench/peers.py).

    .venv/bin/python bench/llada_ckpt.py OUT [--d-model 512] [--layers 16] [--heads 8] [--mlp 1408]

`unmask.families.tiny.write_tiny("llada", OUT)` writes the tokenizer files, tokenizer_config.json and
generation_config.json (LLaDA's special tokens, compact ids after a 300-token byte-level BPE); this
then replaces the weights (bf16, two shards with an index, as LLaDA's directories are) and config.json
with a network of the given size. The weights are random: projections N(0, 1/fan_in), embeddings
N(0, 1), a head scaled for logits of standard deviation ~3, and the head rows of EOS, end of turn and
`<|mdm_mask|>` set to zero so that no engine stops early or commits a mask: every engine then
generates the full budget and greedy decoding is decisive. Default: 51.7M parameters (d_model 512,
16 layers, 8 heads, SwiGLU 1408, a 305-token vocabulary).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from unmask.config import ModelConfig
from unmask.families import registry
from unmask.families.spec import attention_fields
from unmask.families.tiny import write_tiny
from unmask.model import Transformer


def write_shards(state: dict[str, torch.Tensor], out: Path, shards: int = 2) -> None:
    """Safetensors shards plus model.safetensors.index.json, as LLaDA's directories hold them."""
    names, weight_map = sorted(state), {}
    per = math.ceil(len(names) / shards)
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in names[s * per:(s + 1) * per]}, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names[s * per:(s + 1) * per], file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_llada(out: str | Path, *, d_model: int = 512, n_layers: int = 16, n_heads: int = 8,
                mlp_hidden: int = 1408, max_seq_len: int = 4096, seed: int = 0) -> tuple[Path, int]:
    """Write the checkpoint into `out`; returns (out, parameter count)."""
    out = Path(out)
    write_tiny("llada", out, seed=seed)  # tokenizer files, generation_config.json
    for f in out.glob("model*.safetensors*"):
        f.unlink()
    raw = json.loads((out / "config.json").read_text())
    spec = registry.get("llada")
    cfg = ModelConfig(family="llada", max_seq_len=max_seq_len, vocab_size=raw["vocab_size"], d_model=d_model,
                      n_layers=n_layers, n_heads=n_heads, mlp_hidden=mlp_hidden, rope_theta=500000.0,
                      tie_embeddings=False, mask_token_id=raw["mask_token_id"], eos_token_id=raw["eos_token_id"],
                      pad_token_id=raw["pad_token_id"], block_size=32, **attention_fields("full"))
    with torch.device("meta"):
        net = Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in net.state_dict().items():
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape)
        elif name.startswith("embed"):
            t = torch.randn(p.shape, generator=g)
        else:
            t = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
            if name.startswith("lm_head"):
                t *= 3.0
        state[name] = t
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    eot = json.loads((out / "tokenizer.json").read_text())
    ids = {a["content"]: a["id"] for a in eot["added_tokens"]}
    for tok in (tok_cfg["eos_token"], spec.end_of_turn, spec.mask_token):
        state["lm_head.weight"][ids[tok]] = 0.0
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}
    write_shards(spec.state_to_hf(state, cfg), out)
    (out / "config.json").write_text(json.dumps(spec.config_to_hf(cfg), indent=2) + "\n")
    return out, sum(v.numel() for v in state.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--mlp", type=int, default=1408)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    out, n = write_llada(a.out, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, mlp_hidden=a.mlp, seed=a.seed)
    print(f"{out}: LLaDA layout, {n / 1e6:.1f}M parameters")


if __name__ == "__main__":
    main()
