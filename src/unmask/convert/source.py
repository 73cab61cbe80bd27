"""The model `unmask convert` reads: its configs (restored from the record a foreign config.json keeps,
where it still describes the network), tokenizer, decoding defaults and a reader of its tensors."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import GenerationConfig, ModelConfig
from ..errors import UserError
from ..families.load import cast, meta_network, read_state
from .target import differences

RECORD_KEY = "unmask"  # where a foreign config.json keeps our configs (unmask.convert's docstring)


@dataclass
class _Source:
    path: Path
    cfg: ModelConfig
    family: object  # FamilySpec of its conventions (tokenizer, chat, decoding)
    layout: str  # the model_type of its files ("unmask" for ours, "gguf" for a GGUF file)
    tokenizer: object
    generation: GenerationConfig
    read_tensors: Callable[[torch.dtype | None], dict]
    hf_generation: dict | None = None  # a foreign directory's generation_config.json
    card: str | None = None
    notes: list[str] = field(default_factory=list)


def _dir_tensors(path: Path, cfg: ModelConfig, spec) -> Callable[[torch.dtype | None], dict]:
    """Our tensors of a checkpoint directory, as stored (or cast to `dtype`), checked as
    `families.load_network` checks them."""
    def read(dtype: torch.dtype | None) -> dict:
        _, shapes = meta_network(cfg)
        return read_state(path, cfg, spec, shapes, lambda name, t: cast(name, t, dtype))
    return read


def _restore(read: ModelConfig, record) -> tuple[ModelConfig, GenerationConfig] | None:
    """Our configs kept in a foreign config.json, if they still describe the network it declares."""
    try:
        kept = ModelConfig.model_validate(record["config"])
        gen = GenerationConfig.model_validate(record["generation"])
    except Exception:  # noqa: BLE001 - any malformed record is ignored, never trusted
        return None
    # What a conversion rewrote exactly: token_shift dropped from a causal model, zero q/k/v biases added.
    adjusted = kept.model_copy(update={
        "token_shift": read.token_shift if read.attention == "causal" else kept.token_shift,
        "qkv_bias": read.qkv_bias or kept.qkv_bias})
    if differences(adjusted, read, zero_bias_ok=False):
        return None
    # The same network: our own spelling of it (family, decoding block size, head_size None, ...).
    return ModelConfig.model_validate(adjusted.model_dump()), gen


def open_source(src: str | os.PathLike) -> _Source:
    """The source's configs and tokenizer (its tensors are read later, once the target is checked)."""
    from .. import families
    from ..families.gguf import find_gguf
    from ..pretrained import UNMASK_FAMILY, conventions, family_tokenizer

    path = Path(src)
    card = (path / "README.md").read_text(encoding="utf-8") if (path / "README.md").is_file() else None
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        from ..families.gguf import load_gguf

        net, cfg, spec, tok, _ = load_gguf(gguf_file, dtype=torch.float32)
        state = {k: v for k, v in net.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}

        def read(dtype):
            return {k: cast(k, v, dtype) for k, v in state.items()}
        return _Source(gguf_file, cfg, spec, "gguf", tok, spec.generation_for(cfg), read)
    raw, spec = families.read_config(path)
    cfg = spec.config_from_hf(raw, path)
    read = _dir_tensors(path, cfg, spec)
    notes: list[str] = []
    if spec.name != UNMASK_FAMILY and RECORD_KEY in raw:
        kept = _restore(cfg, raw[RECORD_KEY])
        if kept is None:
            notes.append(f"{path / 'config.json'}: its {RECORD_KEY!r} record no longer describes the network; "
                         "ignored (the family's own settings are used)")
        else:
            cfg, gen = kept
            family = families.get(cfg.family)
            try:
                tok = family_tokenizer(path, cfg, family)
            except UserError:
                notes.append(f"{path / 'config.json'}: its {RECORD_KEY!r} record names family {cfg.family!r} "
                             "but the tokenizer files are not that family's; record ignored")
            else:
                return _Source(path, cfg, family, spec.model_types[0], tok, gen, read, _hf_gen(path), card)
            cfg = spec.config_from_hf(raw, path)
    family, tok, gen = conventions(path, cfg, spec)
    hf_gen = None if spec.name == UNMASK_FAMILY else _hf_gen(path)
    return _Source(path, cfg, family, spec.model_types[0], tok, gen, read, hf_gen, card, notes)


def _hf_gen(path: Path) -> dict | None:
    f = path / "generation_config.json"
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None

