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
