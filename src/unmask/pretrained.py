"""Checkpoints in our layout: config.json, safetensors weights (sharded), tokenizer.json,
generation_config.json and a model card. `unmask.load(None)` gives the embedded default model.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import GenerationConfig, ModelConfig, atomic_write_text, load_json, save_json
from .errors import UserError
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

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    files = []
    if (path / INDEX).exists():
        try:
            index = json.loads((path / INDEX).read_text())
            files = sorted(set(index["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path / INDEX}: corrupt shard index; re-export the checkpoint") from None
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise UserError(f"{path}: no model.safetensors or {INDEX}; is this a checkpoint directory?")
    state = {}
    for name in files:
        try:
            state.update(load_file(path / name))
        except FileNotFoundError:
            raise UserError(f"{path / name}: shard listed in the index is missing") from None
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path / name}: corrupt safetensors file ({e}); re-download or re-export it") from None
    return state


def _check_shapes(net: Transformer, state: dict[str, torch.Tensor], path: Path) -> None:
    want = {k: v.shape for k, v in net.state_dict().items()}
    if net.config.tie_embeddings:
        want.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise UserError(f"{path}: config.json does not match the weights ({what}); use the config saved with them")
    for k, shape in want.items():
        if state[k].shape != shape:
            raise UserError(
                f"{path}: config.json does not match the weights: {k} is {tuple(state[k].shape)} "
                f"but the config implies {tuple(shape)}"
            )


def load(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> Pretrained:
    """Load a checkpoint directory in our layout; None loads the embedded default model."""
    from .tokenizer import Tokenizer

    path = Path(path) if path is not None else default_model_dir()
    if not path.is_dir():
        raise UserError(f"{path}: model directory not found")
    if not (path / "config.json").exists():
        raise UserError(f"{path}: no config.json; not a model directory in unmask's layout")
    raw = _read_json(path / "config.json")
    if raw.get("model_type") != "unmask":
        raise UserError(f"{path}/config.json: model_type {raw.get('model_type')!r} is not supported; "
                        "convert it with `unmask convert`")
    cfg = load_json(ModelConfig, path / "config.json")
    gen = load_json(GenerationConfig, path / "generation_config.json") if (path / "generation_config.json").exists() \
        else GenerationConfig(block_size=cfg.block_size)
    tok = Tokenizer.from_file(path / "tokenizer.json")
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"{path}: tokenizer has {tok.vocab_size} tokens but config.json says vocab_size={cfg.vocab_size}")
    for name, want in (("mask_token_id", tok.mask_id), ("eos_token_id", tok.eos_id), ("pad_token_id", tok.pad_id)):
        if getattr(cfg, name) != want:
            raise UserError(f"{path}/config.json: {name}={getattr(cfg, name)} but tokenizer.json has id {want}; "
                            "the tokenizer does not belong to these weights")
    with torch.device("meta"):
        net = Transformer(cfg)
    state = _read_state_dict(path)
    _check_shapes(net, state, path)
    net = net.to_empty(device=device)
    net.load_state_dict(state, strict=False)
    if cfg.tie_embeddings:
        net.lm_head.weight = net.embed.weight
    # RoPE tables are buffers that meta-device construction left empty.
    from .model.transformer import rope_tables
    net.rope_cos, net.rope_sin = (t.to(device) for t in rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta))
    net = net.to(dtype).eval()
    return Pretrained(net, tok, cfg, gen, path)


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}:{e.lineno}: corrupt JSON ({e.msg})") from None


def save(model: Pretrained | Transformer, out: str | os.PathLike, tokenizer=None,
         generation: GenerationConfig | None = None, card: str | None = None,
         dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a checkpoint directory atomically: everything goes to a temp dir that is renamed into place."""
    if isinstance(model, Pretrained):
        net, tokenizer = model.net, tokenizer or model.tokenizer
        generation = generation or model.generation
    else:
        net = model
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    umask = os.umask(0)
    os.umask(umask)
    old = out.with_name(f".{out.name}.old")
    try:
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
        # mkdtemp makes the directory 0700; a checkpoint should be as readable as any other file.
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            # Keep a hand-written model card if the caller did not supply one.
            if card is None and (out / "README.md").exists():
                shutil.copy2(out / "README.md", tmp / "README.md")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # interrupted between the two renames: put the previous checkpoint back
        raise
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
