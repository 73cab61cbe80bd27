"""What a checkpoint family is, as data: `FamilySpec`, and the helpers its adapters share.

A family maps a Hugging Face directory onto our `Transformer`: `config_from_hf` turns config.json
(plus the tokenizer files, for special ids the config lacks) into a `ModelConfig`; `state_from_hf`
yields our tensors one by one from a lazy `CheckpointReader`; `state_to_hf` and `config_to_hf` go
back (the tiny-checkpoint generator and round-trip tests use them). Most families are a pure renaming,
written as a `NameMap` of (ours, theirs) templates; fused or stacked tensors get a few lines of code.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import GenerationConfig, ModelConfig, RopeScaling, parse
from ..errors import UserError
from .checkpoint import CheckpointReader

Shapes = Mapping[str, torch.Size]
StateFromHF = Callable[[CheckpointReader, ModelConfig, Shapes], Iterator[tuple[str, torch.Tensor]]]
StateToHF = Callable[[Mapping[str, torch.Tensor], ModelConfig], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class FamilySpec:
    """One checkpoint family (one or more Hugging Face `model_type`s)."""

    name: str
    model_types: tuple[str, ...]
    config_from_hf: Callable[[dict, Path], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict]
    state_from_hf: StateFromHF
    state_to_hf: StateToHF
    # Decoding defaults, as GenerationConfig fields (`generation_config()` validates them).
    generation: dict[str, Any] = field(default_factory=dict)
    # Where the chat template lives, in the order to look: a .jinja file, or a JSON file whose
    # `chat_template` key holds it (tokenizer_config.json).
    chat_template_files: tuple[str, ...] = ("tokenizer_config.json",)
    end_of_turn: str | None = None  # the token that closes an assistant turn
    mask_token: str = "<|mask|>"  # the [MASK] token's text in the family's tokenizer

    def generation_config(self, **overrides) -> GenerationConfig:
        return GenerationConfig(**{**self.generation, **overrides})

    def generation_for(self, cfg: ModelConfig) -> GenerationConfig:
        """The decoding defaults for a model of this family: a block-causal one decodes in its own blocks."""
        return self.generation_config(**({"block_size": cfg.block_size} if cfg.attention == "block" else {}))

    def chat_template(self, path: str | Path) -> str | None:
        """The chat template text shipped in the checkpoint directory, or None."""
        for name in self.chat_template_files:
            f = Path(path) / name
            if not f.exists():
                continue
            if f.suffix == ".json":
                tpl = read_json(f).get("chat_template")
                if isinstance(tpl, list):  # the named-templates form: [{"name": ..., "template": ...}]
                    tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
                if isinstance(tpl, str):
                    return tpl
            else:
                return f.read_text(encoding="utf-8")
        return None


# ---- tensor names ---------------------------------------------------------------------------------
_PLACEHOLDERS = {"i": r"\d+", "e": r"\d+", "w": r"weight|bias"}


def _compile(template: str) -> re.Pattern:
    out = re.escape(template)
    for k, pat in _PLACEHOLDERS.items():
        out = out.replace(re.escape("{" + k + "}"), f"(?P<{k}>{pat})")
    return re.compile(out)


class NameMap:
    """A renaming between our tensor names and a family's, as (ours, theirs) templates with the
    placeholders {i} (layer), {e} (expert) and {w} (weight or bias)."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = [(_compile(ours), _compile(theirs), ours, theirs) for ours, theirs in pairs]

    def to_hf(self, ours: str) -> str:
        for pat, _, _, theirs in self.pairs:
            m = pat.fullmatch(ours)
            if m:
                return theirs.format(**m.groupdict())
        raise KeyError(f"no checkpoint name for our tensor {ours}")

    def from_hf(self, theirs: str) -> str:
        for _, pat, ours, _ in self.pairs:
            m = pat.fullmatch(theirs)
            if m:
                return ours.format(**m.groupdict())
        raise KeyError(f"no tensor of ours for checkpoint tensor {theirs}")

    def state_from_hf(self, reader: CheckpointReader, cfg: ModelConfig, shapes: Shapes
                      ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of ours, read under its family name and checked against its shape."""
        if cfg.tie_embeddings:
            head = self.to_hf("lm_head.weight")
            if head in reader:
                reader.ignore(head)
        for ours, shape in shapes.items():
            yield ours, reader.get(self.to_hf(ours), shape)

    def state_to_hf(self, state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        return {self.to_hf(k): v for k, v in state.items()
                if not (cfg.tie_embeddings and k == "lm_head.weight")}


# ---- config.json helpers --------------------------------------------------------------------------
def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: corrupt JSON ({e.msg}); re-download the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def need(raw: dict, key: str, path: Path):
    """A config.json field the family cannot do without."""
    if raw.get(key) is None:
        raise UserError(f"{path / 'config.json'}: field {key!r} is missing; the config is incomplete")
    return raw[key]


def unsupported(path: Path, what: str) -> UserError:
    return UserError(f"{path / 'config.json'}: {what} is not supported by unmask's network; "
                     "this checkpoint cannot be loaded")


def first_id(value) -> int | None:
    """A token id that may be written as a list (generation configs list several eos ids)."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def token_id(path: Path, *texts: str) -> int | None:
    """The id of the first of `texts` found among the added tokens of tokenizer.json or
    tokenizer_config.json (where the checkpoint's special tokens live)."""
    table: dict[str, int] = {}
    tj = path / "tokenizer.json"
    if tj.exists():
        for t in read_json(tj).get("added_tokens") or []:
            if isinstance(t, dict) and isinstance(t.get("id"), int):
                table.setdefault(t.get("content"), t["id"])
    tc = path / "tokenizer_config.json"
    if tc.exists():
        for i, t in (read_json(tc).get("added_tokens_decoder") or {}).items():
            if isinstance(t, dict) and str(i).isdigit():
                table.setdefault(t.get("content"), int(i))
    return next((table[t] for t in texts if t in table), None)


def tokenizer_token(path: Path, key: str) -> str | None:
    """The text of a named special token (`eos_token`, `pad_token`, ...) in tokenizer_config.json."""
    tc = path / "tokenizer_config.json"
    if not tc.exists():
        return None
    v = read_json(tc).get(key)
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


def special_ids(raw: dict, path: Path, mask_tokens: tuple[str, ...], native: dict[str, int]) -> dict[str, int]:
    """mask/eos/pad ids: config.json first, then the tokenizer files, then the family's native ids."""
    def from_tokenizer(key: str) -> int | None:
        text = tokenizer_token(path, key)
        return token_id(path, text) if text else None

    mask = first_id(raw.get("mask_token_id"))
    if mask is None:
        mask = token_id(path, *mask_tokens)
    eos = first_id(raw.get("eos_token_id"))
    if eos is None:
        eos = from_tokenizer("eos_token")
    pad = first_id(raw.get("pad_token_id"))
    if pad is None:
        pad = from_tokenizer("pad_token")
    mask = native["mask"] if mask is None else mask
    eos = native["eos"] if eos is None else eos
    return {"mask_token_id": mask, "eos_token_id": eos, "pad_token_id": native.get("pad", eos) if pad is None else pad}


_ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")


def rope_scaling_from_hf(raw: dict, path: Path, max_positions: int) -> RopeScaling | None:
    """config.json `rope_scaling` -> RopeScaling (None, or type "default", means none).

    `original_max_position_embeddings` defaults to the config's own context, as Hugging Face does;
    the declared `factor` is used as is.
    """
    rs = raw.get("rope_scaling")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in _ROPE_TYPES:
        raise unsupported(path, f"rope_scaling type {kind!r} (supported: {', '.join(_ROPE_TYPES)})")
    fields = {k: rs[k] for k in RopeScaling.model_fields if k in rs and rs[k] is not None}
    fields["type"] = kind
    fields.setdefault("original_max_position_embeddings", max_positions)
    return parse(RopeScaling, fields, f"{path / 'config.json'} rope_scaling")


def rope_scaling_to_hf(cfg: ModelConfig) -> dict | None:
    if cfg.rope_scaling is None:
        return None
    d = cfg.rope_scaling.model_dump(exclude_none=True)
    d["rope_type"] = d.pop("type")
    return d


def model_config(data: dict, path: Path) -> ModelConfig:
    """Validate the mapped fields; an impossible value is a one-line UserError naming config.json."""
    return parse(ModelConfig, data, path / "config.json")


def attention_fields(attention: str) -> dict:
    """Our attention mode and the objective that trains it (ArchConfig checks they agree)."""
    from ..config import OBJECTIVE_ATTENTION
    objective = {v: k for k, v in OBJECTIVE_ATTENTION.items()}[attention]
    return {"attention": attention, "objective": objective}
