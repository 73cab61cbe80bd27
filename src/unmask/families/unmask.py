"""Our own checkpoint layout (pretrained.py writes it): tensor names are our module names, config.json
is a ModelConfig, the chat template is the tokenizer's own (tokenizer/bpe.py)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..config import ModelConfig
from .checkpoint import CheckpointReader
from .spec import FamilySpec, Shapes, model_config


def config_from_hf(raw: dict, path: Path) -> ModelConfig:
    return model_config(raw, path)


def config_to_hf(cfg: ModelConfig) -> dict:
    return cfg.model_dump()


def state_from_hf(reader: CheckpointReader, cfg: ModelConfig, shapes: Shapes) -> Iterator[tuple[str, torch.Tensor]]:
    if cfg.tie_embeddings and "lm_head.weight" in reader:
        reader.ignore("lm_head.weight")
    for name, shape in shapes.items():
        yield name, reader.get(name, shape)


def state_to_hf(state: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}


SPEC = FamilySpec(
    name="unmask",
    model_types=("unmask",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    state_from_hf=state_from_hf,
    state_to_hf=state_to_hf,
    generation={},  # GenerationConfig's defaults; a checkpoint's generation_config.json overrides them
    chat_template_files=(),
    end_of_turn="<|end|>",
    mask_token="<|mask|>",
)
