"""Checkpoints in our layout: config.json, safetensors weights (sharded), tokenizer.json,
generation_config.json and a model card. `unmask.load(None)` gives the embedded default model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import GenerationConfig, ModelConfig, atomic_write_text, load_json, save_json
from .errors import UserError
from .fsutil import staged_dir
from .model import Transformer

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = "unmask-coder"
DEFAULT_AR_MODEL = "unmask-coder-ar"
INDEX = "model.safetensors.index.json"
MAX_SHARD_BYTES = 15 * 2**20 - 2**16  # stay under the repo's 15 MiB file limit, header included


def default_model_dir(name: str = DEFAULT_MODEL) -> Path:
    """UNMASK_MODELS overrides where embedded models live (for installs outside the repo)."""
    root = Path(os.environ.get("UNMASK_MODELS", REPO_ROOT / "models"))
    return root / name


@dataclass
class Pretrained:
    """A loaded model: the network plus everything needed to talk to it."""

    net: Transformer
    tokenizer: "object"
    config: ModelConfig
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    path: Path | None = None
    family: "object" = None  # the FamilySpec it was loaded through (unmask.families); None: built in memory
    commit_rule: "object" = None  # the learned policy's CommitRule stored beside the weights (sampling/commit_rule.py)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """The raw forward: (B, T) token ids (a tensor, or a list of equal-length lists) -> float32
        (B, T, vocab) under the model's own attention (full, block-causal with blocks aligned at
        position 0, or causal), where position i scores the token at position i. Families whose
        outputs are shifted (Dream, Fast-dLLM v2, and autoregressive models: the output at i scores
        i + 1) are shifted back; position 0, which nothing scores, repeats position 1's source, as
        Dream's sampler does."""
        from .decode import model_logit_shift
        from .model.logit_shift import align_logits

        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise UserError(f"input_ids must be (batch, length) token ids, got shape {tuple(ids.shape)}")
        vocab = self.config.vocab_size
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
            raise UserError(f"input_ids hold ids outside the vocabulary of {vocab}")
        return align_logits(self.net(ids).float(), model_logit_shift(self.config))


def load(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, adapter: str | os.PathLike | None = None) -> Pretrained:
    """Load a checkpoint directory: our layout, or any registered family's Hugging Face layout
    (`unmask.families`: LLaDA, Dream, SDAR, LLaDA2 MoE, Fast-dLLM v2, Llama, Qwen2, Qwen3),
    dispatched on config.json's `model_type`; or a GGUF file (a `.gguf` path, or a directory holding
    one .gguf and no config.json: `unmask.families.gguf.load_gguf`). None loads the embedded default
    model. Tensors are read lazily (memory-mapped, one at a time) straight into `dtype` on `device`;
    nothing in the directory is ever executed. adapter: a LoRA adapter directory (`unmask finetune
    --lora --save-adapter`) merged into the weights; one trained on another base is refused."""
    from .families import load_network

    path = Path(path) if path is not None else default_model_dir()
    from .families.gguf import find_gguf
    gguf_file = find_gguf(path)  # a .gguf file, or a directory holding one .gguf and no config.json
    if gguf_file is not None:
        from .families.gguf import load_gguf
        if adapter is not None:
            raise UserError(f"--adapter applies to a checkpoint directory, not to the GGUF file {gguf_file}; "
                            "merge it first (unmask finetune writes the merged model beside the adapter)")
        net, cfg, spec, tok, _ = load_gguf(gguf_file, device=device, dtype=dtype)
        return Pretrained(net.eval(), tok, cfg, spec.generation_for(cfg), path, spec)
    net, cfg, spec, raw = load_network(path, device=device, dtype=dtype)
    if adapter is not None:
        from .train.lora import load_adapter
        load_adapter(net, adapter, base_name=str(path))
    family, tok, gen = conventions(path, cfg, spec)
    from .sampling.commit_rule import CommitRule
    return Pretrained(net.eval(), tok, cfg, gen, path, family, CommitRule.load(path))


UNMASK_FAMILY = "unmask"


def _our_tokenizer(path: Path, cfg: ModelConfig):
    from .tokenizer import Tokenizer

    tok = Tokenizer.from_file(path / "tokenizer.json")
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{path}: tokenizer has {tok.vocab_size} tokens but config.json says vocab_size={cfg.vocab_size}")
    for name, want in (("mask_token_id", tok.mask_id), ("eos_token_id", tok.eos_id), ("pad_token_id", tok.pad_id)):
        if getattr(cfg, name) != want:
            raise UserError(f"{path}/config.json: {name}={getattr(cfg, name)} but tokenizer.json has id {want}; "
                            "the tokenizer does not belong to these weights")
    return tok


def _our_generation(path: Path, cfg: ModelConfig) -> GenerationConfig:
    if (path / "generation_config.json").exists():
        return load_json(GenerationConfig, path / "generation_config.json")
    return GenerationConfig(block_size=cfg.block_size)


def family_tokenizer(path: Path, cfg: ModelConfig, family):
    """The tokenizer of the checkpoint directory `path` as `family` keeps it: ours (checked against
    config.json), or the family's Hugging Face tokenizer files."""
    if family.name == UNMASK_FAMILY:
        return _our_tokenizer(path, cfg)
    from .tokenizer import HFTokenizer
    return HFTokenizer.from_dir(path, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                                pad_id=cfg.pad_token_id, end_token=family.end_of_turn)


def conventions(path: Path, cfg: ModelConfig, spec) -> tuple[object, object, GenerationConfig]:
    """(family, tokenizer, decoding defaults) of a checkpoint directory read through `spec`. Our layout
    may hold a foreign family's weights (a fine-tune of one): its tokenizer and chat conventions are
    that family's, its decoding defaults our generation_config.json."""
    from .families import get as family_of

    family = family_of(cfg.family) if spec.name == UNMASK_FAMILY else spec
    tok = family_tokenizer(path, cfg, family)
    gen = _our_generation(path, cfg) if spec.name == UNMASK_FAMILY else spec.generation_for(cfg)
    return family, tok, gen


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}: corrupt JSON ({e.msg})") from None


def save(model: Pretrained | Transformer, out: str | os.PathLike, tokenizer=None,
         generation: GenerationConfig | None = None, card: str | None = None,
         dtype: torch.dtype = torch.bfloat16, keep: tuple[str, ...] = ()) -> Path:
    """Write a checkpoint directory atomically: everything goes to a temp dir that is renamed into place.
    keep: files of an existing `out` carried into the new one (a hand-written README.md always is)."""
    if isinstance(model, Pretrained):
        net, tokenizer = model.net, tokenizer or model.tokenizer
        generation = generation or model.generation
    else:
        net = model
    out = Path(out)
    with staged_dir(out, keep=("README.md", *keep)) as tmp:  # keep a hand-written model card
        state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
        if net.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        _write_shards(state, tmp)
        save_json(net.config, tmp / "config.json")
        save_json(generation or GenerationConfig(block_size=net.config.block_size), tmp / "generation_config.json")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
        if card is not None:
            atomic_write_text(tmp / "README.md", card)
    return out


def _write_shards(state: dict[str, torch.Tensor], out: Path) -> None:
    shards, cur, size = [], {}, 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if cur and size + nbytes > MAX_SHARD_BYTES:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = state[k]
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in state.values())
    atomic_write_text(out / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
