"""`convert`: the source's tensors through the target's adapter, its config.json, generation config,
tokenizer files and model card, written into a temporary directory beside the destination and renamed
into place."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import GenerationConfig, ModelConfig, atomic_write_text
from ..errors import UserError
from ..families.load import KEEP_FP32
from ..fsutil import staged_dir
from .source import RECORD_KEY, open_source
from .target import UNMASK, plan_target
from .tokenizer_files import tokenizer_notes, write_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "keep": None}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _hf_generation(tok, cfg: ModelConfig, gen: GenerationConfig) -> dict:
    """generation_config.json in Hugging Face's format."""
    eos = [cfg.eos_token_id]
    end = getattr(tok, "end_id", None)
    if end is not None and end != cfg.eos_token_id:
        eos.append(end)
    out: dict = {}
    bos = getattr(tok, "bos_id", None)
    if bos is not None:
        out["bos_token_id"] = bos
    out.update(eos_token_id=eos if len(eos) > 1 else eos[0], pad_token_id=cfg.pad_token_id)
    if gen.temperature > 0:
        out.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
    else:
        out["do_sample"] = False
    out["max_new_tokens"] = gen.max_tokens
    return out


def _check_dst(dst: Path, src: Path) -> None:
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a directory; pick another destination")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "config.json").is_file() \
            and dst.resolve() != src.resolve():
        raise UserError(f"{dst}: exists and is not a model directory; it would be replaced, pick another destination")


# Our causal models go to llama.cpp as llama; a family's own layout where llama.cpp has its architecture.
GGUF_LAYOUTS = ("llama", "qwen2", "qwen3", "llada", "Dream")


def convert_gguf(src: Path, out: Path, to: str, gguf_type: str, warn: Callable[[str], None]) -> Path:
    """`src` as one GGUF file at `out`: converted to the Hugging Face layout `to` in a temporary
    directory (our AR models: `llama` when `to` is ours), then written by the gguf package
    (families/gguf/write.py, laid out as llama.cpp's converter does). Atomic, like every convert."""
    import tempfile

    from ..families.gguf import write_gguf

    if out.exists() and not out.is_file():
        raise UserError(f"{out}: exists and is not a file; pick another destination")
    if to == UNMASK:
        to = "llama"
    if to not in GGUF_LAYOUTS:
        raise UserError(f"--to {to}: llama.cpp has no architecture for it; a GGUF can hold: {', '.join(GGUF_LAYOUTS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        hf = convert(src, Path(tmp) / "hf", to=to, dtype="fp32", warn=warn)
        return write_gguf(hf, out, gguf_type)


def _main_dtype(state: dict[str, torch.Tensor]) -> str:
    sizes: dict[torch.dtype, int] = {}
    for k, v in state.items():
        if v.is_floating_point() and not k.endswith(KEEP_FP32):
            sizes[v.dtype] = sizes.get(v.dtype, 0) + v.numel()
    return _DTYPE_NAMES.get(max(sizes, key=sizes.get), "float32") if sizes else "float32"


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str = UNMASK, dtype: str = "keep",
            warn: Callable[[str], None] = _stderr, gguf_type: str = "F16") -> Path:
    """Write the model at `src` into `dst` in the layout of model_type `to` (module docstring); tensors
    as stored (`dtype` "keep") or as "bf16" / "fp32". Returns `dst`. A model `to` cannot hold, and any
    other user error, is a one-line UserError; exact rewrites are reported through `warn`.

    A `dst` ending in .gguf is a GGUF file for llama.cpp, its tensors in `gguf_type` (F32, F16, BF16,
    Q8_0, ...): see convert_gguf."""
    from .. import families
    from ..pretrained import _write_shards

    src_path, out = Path(src), Path(dst)
    if out.suffix == ".gguf":
        return convert_gguf(src_path, out, to, gguf_type, warn)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    spec = families.get(to)
    _check_dst(out, src_path)
    source = open_source(src_path)
    with staged_dir(out) as tmp:
        write_tokenizer(source.tokenizer, tmp, source.cfg, spec)
        plan = plan_target(source.path, source.cfg, to, tmp)
        notes = source.notes + plan.notes + tokenizer_notes(tmp, to)
        if source.layout == "gguf" and dtype == "keep":
            notes.append(f"{source.path}: GGUF tensors are dequantised; --dtype keep writes them as float32")
        state = source.read_tensors(DTYPES[dtype])
        for name in plan.drop:
            state.pop(name, None)
        if plan.zero_biases:
            for i in range(plan.cfg.n_layers):
                for p in "qkv":
                    w = state[f"layers.{i}.attn.{p}_proj.weight"]
                    state[f"layers.{i}.attn.{p}_proj.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        hf_state = {k: v.contiguous() for k, v in spec.state_to_hf(state, plan.cfg).items()}
        del state
        _write_shards(hf_state, tmp)
        if plan.hf_config is None:
            atomic_write_text(tmp / "config.json", json.dumps(plan.cfg.model_dump(), indent=2) + "\n")
            atomic_write_text(tmp / "generation_config.json",
                              json.dumps(source.generation.model_dump(), indent=2) + "\n")
        else:
            config = dict(plan.hf_config)
            if "torch_dtype" in config or "dtype" in config:
                config["torch_dtype" if "torch_dtype" in config else "dtype"] = _main_dtype(hf_state)
            config[RECORD_KEY] = {"config": source.cfg.model_dump(), "generation": source.generation.model_dump()}
            atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
            same_family = source.layout == to and source.hf_generation is not None
            gen = source.hf_generation if same_family else _hf_generation(source.tokenizer, plan.cfg,
                                                                              source.generation)
            atomic_write_text(tmp / "generation_config.json", json.dumps(gen, indent=2) + "\n")
        del hf_state
        card = source.card
        if card is None and (out / "README.md").is_file():
            card = (out / "README.md").read_text(encoding="utf-8")
        if card is not None:
            atomic_write_text(tmp / "README.md", card)
    for note in notes:
        warn(f"note: {note}")
    return out
