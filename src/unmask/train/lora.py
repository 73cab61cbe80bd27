"""Low-rank adapters through peft, added to a model from outside and merged back before saving, so
a LoRA fine-tune exports an ordinary checkpoint that every loader, the engine and the server read."""
from __future__ import annotations

import torch.nn as nn

from ..errors import UserError


def add_lora(net: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float) -> list[nn.Parameter]:
    """Wrap the linear layers named in `targets` with adapters; everything else is frozen. Returns
    the trainable parameters. The adapters start at zero (B = 0): the model is unchanged until trained."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise UserError("--lora needs the peft package: pip install peft") from None
    names = {n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(targets) - names)
    if missing:
        raise UserError(f"LoRA target {missing[0]!r} names no linear layer of this model; "
                        f"choose from: {', '.join(sorted(names))}")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                       bias="none"), net)
    return [p for p in net.parameters() if p.requires_grad]


def merge_lora(net: nn.Module) -> int:
    """Fold every adapter into its base weight and put the plain linear layer back. Returns how many
    layers were merged."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(n, m) for n, m in net.named_modules() if isinstance(m, LoraLayer)]
    for name, mod in wrapped:
        mod.merge()
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, mod.get_base_layer())
    for p in net.parameters():
        p.requires_grad_(True)
    return len(wrapped)


# ---- adapter-only export: `unmask finetune --lora --save-adapter`, loaded with `load(base, adapter=DIR)` ----
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def base_fingerprint(net: nn.Module) -> str:
    """A digest of a base model's weights that an adapter records and checks before it loads: every
    tensor's name and shape and its first and last 256 values, rounded to bf16 (cheap on an 8B model,
    and no two trainings agree on them). Adapter layers are skipped, so it is the same before and after LoRA."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        if "lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        flat = t.detach().reshape(-1)
        if hasattr(flat, "full_tensor"):
            flat = flat.full_tensor()
        h.update(f"{name}:{tuple(t.shape)}".encode())
        # rounded to bf16: the same digest whether the base is loaded in float32 or bfloat16
        h.update(torch.cat([flat[:256], flat[-256:]]).to("cpu", torch.bfloat16).float().numpy().tobytes())
    return h.hexdigest()[:32]


def adapter_state(net: nn.Module) -> dict:
    """The adapter weights alone (peft's key names), on the CPU; take them before `merge_lora`."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(net).items()}


def save_adapter(state: dict, out, *, base: str, fingerprint: str, rank: int, alpha: float, targets: list[str]) -> None:
    """`adapter_state` alone (peft's file names: adapter_model.safetensors, adapter_config.json with our
    base-model record), written atomically into the directory `out`."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from ..fsutil import staged_dir

    with staged_dir(Path(out)) as tmp:
        save_file(state, tmp / ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets, "bias": "none",
            "base_model_name_or_path": base, "unmask_base_fingerprint": fingerprint}, indent=1) + "\n")


def load_adapter(net: nn.Module, adapter_dir, base_name: str = "the model") -> int:
    """Merge the adapter in `adapter_dir` into `net`'s weights. Refuses, in one line, an adapter
    trained on another base (its recorded fingerprint differs) or of another shape. Returns the number
    of layers merged."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_file, weights = d / ADAPTER_CONFIG, d / ADAPTER_WEIGHTS
    if not cfg_file.exists() or not weights.exists():
        raise UserError(f"--adapter {d}: no {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} there; point it at the "
                        "directory `unmask finetune --lora --save-adapter` wrote (OUT/adapter)")
    try:
        meta = json.loads(cfg_file.read_text())
        rank, alpha, targets = int(meta["r"]), float(meta["lora_alpha"]), list(meta["target_modules"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{cfg_file}: not a LoRA adapter config ({e}); re-export it with --save-adapter") from None
    want = meta.get("unmask_base_fingerprint")
    have = base_fingerprint(net)
    if want is not None and want != have:
        raise UserError(f"--adapter {d} was trained on {meta.get('base_model_name_or_path', 'another model')}, "
                        f"not on {base_name} (base fingerprint {want} != {have}); load it onto the model it was "
                        "trained on")
    add_lora(net, targets, rank, alpha, 0.0)
    from peft import set_peft_model_state_dict

    state = load_file(weights)
    try:
        res = set_peft_model_state_dict(net, state)
    except RuntimeError as e:  # a size mismatch: another architecture
        raise UserError(f"--adapter {d} does not fit {base_name}: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in res.missing_keys if "lora_" in k]
    if res.unexpected_keys or missing:
        k = (res.unexpected_keys or missing)[0]
        raise UserError(f"--adapter {d} does not fit {base_name} ({k}); load it onto the model it was trained on")
    n = merge_lora(net)
    net.eval()
    return n
