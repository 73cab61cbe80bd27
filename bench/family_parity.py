"""Max |logits - reference| of every family fixture, loaded by `unmask.families.load_network`, in fp32
and in bf16 (weights and activations), under each family's default attention.

    .venv/bin/python bench/family_parity.py [--fixtures ../shared/fixtures/families] [--device cpu]

The references were computed in fp32 by each family's own modeling code (see the fixtures' READMEs).
For MoE models the bf16 column also gives the maximum over positions whose experts are the same as in
fp32: bf16 activations flip the expert choice of a few tokens, which changes their logits by design.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from unmask.families import load_network
from unmask.model.mlp import Router


def _routes(net) -> tuple[list, list]:
    """Hooks that record each router's chosen experts (sorted) per token."""
    seen, hooks = [], []
    for m in net.modules():
        if isinstance(m, Router):
            hooks.append(m.register_forward_hook(lambda _m, _i, out: seen.append(out[1].sort(-1).values)))
    return seen, hooks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[2] / "shared/fixtures/families"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(f"{'fixture':18} {'model_type':15} {'attention':10} {'fp32 max|diff|':>15} {'bf16 max|diff|':>15}  note")
    for d in sorted(p for p in Path(args.fixtures).iterdir() if (p / "reference_logits.safetensors").exists()):
        ref = load_file(d / "reference_logits.safetensors")
        ids, want = ref["input_ids"].to(args.device), ref["logits"].to(args.device)
        diffs, routes = {}, {}
        for dtype in (torch.float32, torch.bfloat16):
            net, cfg, spec, raw = load_network(d, device=args.device, dtype=dtype)
            seen, hooks = _routes(net)
            with torch.no_grad():
                diffs[dtype] = (net(ids) - want).abs().amax(-1).flatten()
            routes[dtype] = seen
            for h in hooks:
                h.remove()
        note = ""
        if routes[torch.float32]:
            same = torch.stack([(a == b).all(-1) for a, b in zip(routes[torch.float32], routes[torch.bfloat16])])
            same = same.all(0)
            note = (f"{int((~same).sum())} of {same.numel()} tokens route differently in bf16; "
                    f"max over the others {diffs[torch.bfloat16][same].max().item():.2e}")
        attn = cfg.attention + (f" {cfg.block_size}" if cfg.attention == "block" else "")
        print(f"{d.name:18} {raw['model_type']:15} {attn:10} {diffs[torch.float32].max().item():15.2e} "
              f"{diffs[torch.bfloat16].max().item():15.2e}  {note}")


if __name__ == "__main__":
    main()
