"""What a target layout can hold: our config written as the target's config.json and read back must
describe the same network; a model it cannot hold is refused with one line naming the first feature it
cannot hold and the layouts that can. Exact rewrites are planned here: `token_shift` of a causal model
dropped, q/k/v biases a target always has written as zeros."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig
from ..errors import UserError

UNMASK = "unmask"
_SHIFT_TABLES = ("prev_embed.weight", "gap_embed.weight")


# ---- what a config means ---------------------------------------------------------------------------
def _semantics(c: ModelConfig) -> dict:
    """Everything the network's function and the meaning of its logits depend on, in the order a
    refusal names them. The block size of a causal or full model and a causal model's logit shift
    (always 1, decode.model_logit_shift) are decoding settings, not the network's."""
    from ..decode import model_logit_shift

    return {
        "token_shift": c.token_shift,
        "moe": c.moe.model_dump() if c.moe else None,
        "attention": c.attention,
        "block_size": c.block_size if c.attention == "block" else None,
        "logit_shift": model_logit_shift(c),
        "qk_norm": c.qk_norm,
        "qkv_bias": c.qkv_bias,
        "head_dim": c.head_dim,
        "rotary_dim": c.rotary_dim or c.head_dim,
        "rope_scaling": c.rope_scaling.model_dump() if c.rope_scaling else None,
        "rope_theta": float(c.rope_theta),
        "max_seq_len": c.max_seq_len,
        "d_model": c.d_model,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "kv_heads": c.kv_heads,
        "mlp_hidden": c.hidden,
        "norm_eps": float(c.norm_eps),
        "tie_embeddings": c.tie_embeddings,
        "vocab_size": c.vocab_size,
        "mask_token_id": c.mask_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
    }


def differences(ours: ModelConfig, theirs: ModelConfig, zero_bias_ok: bool = True) -> list[str]:
    """The features `theirs` describes differently from `ours` (q/k/v biases that `ours` lacks are
    no difference when `zero_bias_ok`: they are written as zeros)."""
    a, b = _semantics(ours), _semantics(theirs)
    return [k for k in a if a[k] != b[k] and not (k == "qkv_bias" and zero_bias_ok and not a[k])]


def _feature(key: str, c: ModelConfig) -> str:
    """A feature of `c`, in words."""
    if key == "token_shift":
        return ("token_shift ([MASK] inputs also embed the nearest visible token and its distance: "
                "prev_embed/gap_embed)" if c.token_shift else "no token_shift")
    if key == "moe":
        return "mixture-of-experts layers" if c.moe else "dense MLPs"
    if key == "attention":
        return f"block-causal attention (blocks of {c.block_size})" if c.attention == "block" \
            else f"{c.attention} attention"
    if key == "block_size":
        return f"blocks of {c.block_size}"
    if key == "logit_shift":
        from ..decode import model_logit_shift
        return "shifted logits (position i scores token i + 1)" if model_logit_shift(c) \
            else "unshifted logits (position i scores token i)"
    if key == "qk_norm":
        return "q/k norms" if c.qk_norm else "no q/k norms"
    if key == "qkv_bias":
        return "q/k/v biases" if c.qkv_bias else "no q/k/v biases"
    if key == "head_dim":
        return f"heads {c.head_dim} wide" + ("" if c.head_size is None else " (not d_model / n_heads)")
    if key == "rotary_dim":
        return f"RoPE on {c.rotary_dim or c.head_dim} of {c.head_dim} head dims"
    return f"{key} {_semantics(c)[key]!r}"



# ---- the target ------------------------------------------------------------------------------------
@dataclass
class _Plan:
    cfg: ModelConfig  # the network as the target reads it
    hf_config: dict | None  # None: our layout
    drop: tuple[str, ...] = ()  # tensors of ours the target does not hold (inert)
    zero_biases: bool = False  # add zero q/k/v biases
    notes: list[str] = field(default_factory=list)


def _foreign_config(cfg: ModelConfig, spec, to: str, probe: Path) -> tuple[dict, ModelConfig]:
    """(config.json for `to`, the ModelConfig `to` reads from it); UserError if it cannot be written."""
    hf = spec.config_to_hf(cfg.model_copy(update={"family": to}))
    for key in ("mask_token_id", "eos_token_id", "pad_token_id"):  # every reader takes the ids from here first
        if hf.get(key) is None:
            hf[key] = getattr(cfg, key)
    hf = json.loads(json.dumps(hf))
    return hf, spec.config_from_hf(hf, probe)


def _fits(cfg: ModelConfig, to: str, probe: Path) -> bool:
    from .. import families

    if to == UNMASK:
        return True
    if cfg.token_shift and cfg.attention != "causal":
        return False
    if cfg.token_shift:
        cfg = cfg.model_copy(update={"token_shift": False})
    try:
        _, back = _foreign_config(cfg, families.get(to), to, probe)
    except UserError:
        return False
    return not differences(cfg, back)


def _refuse(src: Path, cfg: ModelConfig, to: str, what: str, probe: Path) -> UserError:
    from .. import families

    ok = [t for t in families.supported() if t != to and _fits(cfg, t, probe)]
    return UserError(f"{src}: cannot convert to {to!r}: {what}; layouts that can hold this model: {', '.join(ok)}")


def plan_target(src: Path, cfg: ModelConfig, to: str, probe: Path) -> _Plan:
    from .. import families

    if to == UNMASK:
        return _Plan(cfg, None)
    spec = families.get(to)
    notes: list[str] = []
    drop: tuple[str, ...] = ()
    if cfg.token_shift:
        if cfg.attention != "causal":
            raise _refuse(src, cfg, to, f"this model has {_feature('token_shift', cfg)}, which no Hugging Face "
                                        "family has", probe)
        cfg = cfg.model_copy(update={"token_shift": False})
        drop = _SHIFT_TABLES
        notes.append(f"token_shift dropped: its tables (prev_embed, gap_embed) only feed [MASK] inputs, which a "
                     f"causal model never sees; the {to!r} model computes the same logits")
    try:
        hf, back = _foreign_config(cfg, spec, to, probe)
    except UserError as e:
        raise _refuse(src, cfg, to, str(e), probe) from None
    diff = differences(cfg, back)
    if diff:
        key = diff[0]
        raise _refuse(src, cfg, to, f"this model has {_feature(key, cfg)}, which a {to!r} checkpoint cannot hold "
                                    f"(it would read as {_feature(key, back)})", probe)
    zero = back.qkv_bias and not cfg.qkv_bias
    if zero:
        notes.append(f"a {to!r} checkpoint always has q/k/v biases: written as zeros (the same function)")
    return _Plan(back, hf, drop, zero, notes)

