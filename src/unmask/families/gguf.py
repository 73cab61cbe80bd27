"""GGUF files (llama.cpp's format) read into our Transformer, dequantised tensor by tensor.

`load_gguf(path, device, dtype) -> (net, cfg, spec, tokenizer, metadata)`. The architectures read are
those llama.cpp has and unmask has a family for:

| GGUF `general.architecture` | our family (model_type) | attention | q/k rows |
|---|---|---|---|
| `llama` | `llama` (families/llama.py) | causal | permuted by llama.cpp's converter |
| `qwen2` | `qwen2` | causal | as in the HF checkpoint |
| `qwen3` | `qwen3` | causal | as in the HF checkpoint |
| `llada` | `llada` (LLaDA 8B / 1.5) | full | permuted |
| `dream` | `Dream` (Dream 7B, ...) | full, logits shifted | as in the HF checkpoint |

llama.cpp's `llada-moe` (LLaDA-MoE) has no unmask family, and SDAR, LLaDA2 and Fast-dLLM v2 have no
llama.cpp architecture; any other architecture is a one-line UserError listing these five.

Conventions of llama.cpp's converter (convert_hf_to_gguf.py) that are undone here:
- For the `llama` and `llada` architectures (llama.cpp applies "normal", interleaved RoPE to them) the
  rows of q and k (weights and biases) are permuted per head from Hugging Face's rotate-half order
  (first half, second half) to interleaved pairs: within each head, row 2j holds HF row j and row
  2j+1 holds HF row j + head_dim/2 (k uses the kv head count). `_unpermute` restores the HF order
  (`_permute` is the converter's direction, used by `write_gguf`). Qwen2/Qwen3/Dream use llama.cpp's
  "neox" RoPE, which is rotate-half: no permutation.
- The config lives in metadata keys (`{arch}.embedding_length`, `.block_count`, `.attention.head_count`,
  ...), the head is absent when tied, `tokenizer.ggml.*` hold the vocabulary. A `rope_freqs` tensor
  (llama 3 RoPE scaling) is refused: our RoPE has no per-frequency factors.

Weights: the reader memory-maps the file (gguf.GGUFReader) and each tensor is dequantised on its own
(`gguf.quants.dequantize`: F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants Q2_K..Q6_K, the IQ
types, TQ1_0/TQ2_0, MXFP4; F64 here), then converted to the requested dtype and device, so the model
is never held twice. A type the gguf package cannot dequantise (Q8_1, Q8_K, integers) is a one-line
UserError naming the file, the tensor and the supported types.

Tokenizer: a `tokenizer.json` beside the .gguf wins (checked to hold the GGUF's vocabulary); otherwise
one is rebuilt from the metadata with the `tokenizers` package: `tokenizer.ggml.model` "gpt2"
(byte-level BPE; tokens, token types, merges), CONTROL and USER_DEFINED tokens as added tokens
(special and not), llama.cpp's "[PADn]" filler ids left out, and `tokenizer.ggml.pre` choosing the
pre-tokenizer of the original tokenizer.json:
- `gpt-2`: GPT-2's ByteLevel split (what our own tokenizers and the dLLM fixtures use);
- `llama-bpe` / `llama3` / `llama-v3`: Llama 3's Split regex + ByteLevel, merges ignored for whole-word
  vocabulary hits (`ignore_merges`);
- `qwen2`: NFC normalizer + Qwen2's Split regex + ByteLevel (Qwen2, Qwen2.5, Qwen3, Dream).
These are the pipelines of the original tokenizer.json files (not llama.cpp's regex rewrites); the tests
check them against tokenizer.json files that transformers' own Qwen2 and tiktoken (Llama 3) conversions
build, and our GPT-2 style ones. Any other pre-tokenizer is a UserError asking for the model's
tokenizer.json beside the .gguf (so is a missing one: GGUFs from before `tokenizer.ggml.pre` existed).
The chat template comes from `tokenizer.chat_template`; bos/eos/pad/mask/eot/FIM ids from their
`tokenizer.ggml.*_token_id` keys.

Special ids: mask from `tokenizer.ggml.mask_token_id` (llama.cpp writes it for LLaDA and Dream), else
the family's mask token in the vocabulary, else (AR families) the placeholder rule of
families/llama.py, else the family's native id; eos, pad and bos from their keys. The logit shift is the
family's (Dream 1, LLaDA 0), unless `diffusion.shift_logits` says otherwise. Peak memory while loading
is the model in `dtype` plus one tensor dequantised to float32.

`write_gguf(src_dir, out, qtype)` goes the other way for a checkpoint directory of these families,
laid out as llama.cpp's converter lays it out (tests build GGUF fixtures with it).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import UserError
from ..model import Transformer
from ..tokenizer.hf_ids import END_NAMES, FIM_NAMES, MASK_NAMES
from . import registry
from .llama import placeholder_mask_id
from .load import _check_memory, _convert, estimate_bytes, load_network
from .spec import FamilySpec, NameMap

SUFFIX = ".gguf"

# GGUF architecture -> (our family's model_type, whether llama.cpp permuted the q/k rows)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
    "llada": ("llada", True),
    "dream": ("Dream", False),
}
_KNOWN_ELSEWHERE = {"llada-moe": "LLaDA-MoE has no unmask family yet"}
_CAUSAL = ("llama", "qwen2", "qwen3")

# Our tensor names <-> llama.cpp's (the same for every architecture above).
NAMES = NameMap([
    ("embed.weight", "token_embd.weight"),
    ("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.attn.q_proj.{w}", "blk.{i}.attn_q.{w}"),
    ("layers.{i}.attn.k_proj.{w}", "blk.{i}.attn_k.{w}"),
    ("layers.{i}.attn.v_proj.{w}", "blk.{i}.attn_v.{w}"),
    ("layers.{i}.attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    ("layers.{i}.attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    ("layers.{i}.attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
    ("layers.{i}.mlp_norm.weight", "blk.{i}.ffn_norm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    ("layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    ("layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
    ("norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
])
_IGNORED = (".attn_rot_embd.weight",)  # precomputed RoPE tables some old files carry; we compute our own

# token types (llama.cpp's LLAMA_TOKEN_TYPE_*)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The original pre-tokenizer patterns of the Llama 3 and Qwen2 tokenizer.json files.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("gpt-2", "llama-bpe", "llama3", "llama-v3", "qwen2")


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency of unmask
        raise UserError("reading GGUF files needs the gguf package: pip install 'gguf>=0.10'") from None
    return gguf


# ---- where the file is -------------------------------------------------------------------------
def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: `path` itself when it ends in .gguf, or the only .gguf in a
    directory that has no config.json; None when `path` is something else (a checkpoint directory).
    A directory without config.json holding several .gguf files is a UserError."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX and not path.is_dir():
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        raise UserError(f"{path}: holds {len(found)} .gguf files ({', '.join(p.name for p in found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}); pass the one to load")
    return found[0] if found else None


def _open(file: Path):
    gguf = _gguf()
    if not file.is_file():
        raise UserError(f"{file}: GGUF file not found")
    try:
        return gguf.GGUFReader(file, "r")
    except (ValueError, KeyError, IndexError, TypeError, OSError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{file}: truncated or corrupt GGUF file ({msg}); re-download it") from None


def read_metadata(reader, file: str | os.PathLike = "GGUF file") -> dict[str, Any]:
    """The key/value metadata of an open GGUFReader as Python values (header fields left out)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise UserError(f"{file}: metadata key {name} is corrupt ({e}); re-download the file") from None
    return out


# ---- tensors -----------------------------------------------------------------------------------
def _dequantizable() -> list[str]:
    gguf = _gguf()
    traits = getattr(gguf.quants, "_type_traits", {})
    q = gguf.GGMLQuantizationType
    return [t.name for t in q if t in (q.F32, q.F16, q.F64) or t in traits]


class _Tensors:
    """The tensors of a GGUF file by name, dequantised one at a time to float32 torch tensors."""

    def __init__(self, reader, file: Path):
        self.file = file
        self.by_name = {t.name: t for t in reader.tensors}
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical shape, PyTorch order (GGUF stores ggml's reversed `ne`)."""
        return tuple(int(d) for d in reversed(self.by_name[name].shape.tolist()))

    def check_types(self, names: Iterable[str]) -> None:
        ok = set(_dequantizable())
        for name in names:
            t = self.by_name[name]
            if t.tensor_type.name not in ok:
                raise UserError(f"{self.file}: tensor {name} is stored as {t.tensor_type.name}, which unmask cannot "
                                f"dequantize; supported: {', '.join(sorted(ok))}")

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.by_name:
            raise UserError(f"{self.file}: tensor {name} is missing but the GGUF metadata implies it; the file "
                            "is incomplete or its metadata does not match its tensors")
        got = self.shape(name)
        if got != tuple(shape):
            raise UserError(f"{self.file}: tensor {name} has shape {got} but the GGUF metadata implies "
                            f"{tuple(shape)}; the metadata does not match the tensors")
        gguf = _gguf()
        t = self.by_name[name]
        q = gguf.GGMLQuantizationType
        try:
            if t.tensor_type == q.F32:
                arr = np.array(t.data, dtype=np.float32)  # a copy: the mapping is read-only
            elif t.tensor_type == q.F64:
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{self.file}: tensor {name} is stored as {t.tensor_type.name}, which unmask cannot "
                            f"dequantize; supported: {', '.join(sorted(_dequantizable()))}") from None
        except (ValueError, OSError) as e:
            raise UserError(f"{self.file}: cannot read tensor {name} ({e}); the file is truncated or corrupt, "
                            "re-download it") from None
        self.used.add(name)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(got))


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half row order -> llama.cpp's interleaved order, per head (the converter's step)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's interleaved row order -> HF rotate-half order, per head (undoes `_permute`)."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _heads_of(ours: str, cfg: ModelConfig) -> int | None:
    """How many heads the rows of a permuted tensor hold (None: not permuted)."""
    if ".attn.q_proj." in ours:
        return cfg.n_heads
    if ".attn.k_proj." in ours:
        return cfg.kv_heads
    if ours.endswith(("attn.q_norm.weight", "attn.k_norm.weight")):
        return 1
    return None


# ---- config ------------------------------------------------------------------------------------
class _Meta:
    def __init__(self, meta: dict, arch: str, file: Path):
        self.meta, self.arch, self.file = meta, arch, file

    def get(self, key: str, default=None):
        v = self.meta.get(f"{self.arch}.{key}", default)
        if isinstance(v, list):  # per-layer values (some architectures): only uniform ones fit our network
            if len(set(v)) != 1:
                raise UserError(f"{self.file}: {self.arch}.{key} differs between layers ({v[:4]}...); "
                                "unmask's network has one value for every layer")
            v = v[0]
        return v

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            raise UserError(f"{self.file}: GGUF metadata key {self.arch}.{key} is missing; the file is incomplete")
        return v


def _rope_scaling(m: _Meta, context: int) -> dict | None:
    kind = m.get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = _f32(m.get("rope.scaling.factor"))
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        out = {"rope_type": "yarn", "factor": factor,
               "original_max_position_embeddings": m.get("rope.scaling.original_context_length", context)}
        for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow"),
                        ("yarn_attn_factor", "attention_factor")):
            if m.get(f"rope.scaling.{key}") is not None:
                out[hf] = _f32(m.get(f"rope.scaling.{key}"))
        return out
    raise UserError(f"{m.file}: {m.arch}.rope.scaling.type {kind!r} is not supported (supported: linear, yarn)")


def _f32(v):
    """A float GGUF stored as float32, back to the decimal it was written from (1e-06, not 9.99e-07)."""
    return None if v is None else float(str(np.float32(v)))


def _special(meta: dict, key: str) -> int | None:
    v = meta.get(f"tokenizer.ggml.{key}")
    return int(v) if isinstance(v, int) else None


def _added_tokens(meta: dict) -> dict[int, tuple[str, bool]]:
    tokens = meta.get("tokenizer.ggml.tokens") or []
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    return {i: (t, ty == CONTROL) for i, (t, ty) in enumerate(zip(tokens, types))
            if ty in (CONTROL, USER_DEFINED, UNKNOWN)}


def _mask_id(meta: dict, spec: FamilySpec, causal: bool, exclude: set[int]) -> int | None:
    mask = _special(meta, "mask_token_id")
    if mask is not None:
        return mask
    added = _added_tokens(meta)
    by_text = {t: i for i, (t, _) in added.items()}
    for name in (spec.mask_token, *MASK_NAMES):
        if name in by_text and by_text[name] not in exclude:
            return by_text[name]
    if causal:
        return placeholder_mask_id(added, exclude, meta.get("tokenizer.chat_template"))
    return None  # the family's native id


def gguf_config(meta: dict, tensors: _Tensors, file: Path) -> tuple[ModelConfig, FamilySpec, bool]:
    """(ModelConfig, FamilySpec, whether q/k rows are permuted) of a GGUF file's metadata."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        why = f" ({_KNOWN_ELSEWHERE[arch]})" if arch in _KNOWN_ELSEWHERE else ""
        raise UserError(f"{file}: GGUF architecture {arch!r} is not supported{why}; supported: "
                        f"{', '.join(ARCHITECTURES)}")
    if int(meta.get("split.count") or 1) > 1:
        raise UserError(f"{file}: a split GGUF (part {int(meta.get('split.no', 0)) + 1} of {meta['split.count']}); "
                        "merge the parts first (llama-gguf-split --merge)")
    model_type, permuted = ARCHITECTURES[arch]
    spec = registry.get(model_type)
    m = _Meta(meta, arch, file)
    if "rope_freqs.weight" in tensors:
        raise UserError(f"{file}: tensor rope_freqs.weight (per-frequency RoPE factors, Llama 3 RoPE scaling) is "
                        "not supported by unmask's network")
    if "token_embd.weight" not in tensors:
        raise UserError(f"{file}: tensor token_embd.weight is missing; the file is incomplete")
    vocab, d = tensors.shape("token_embd.weight")
    hidden = m.need("embedding_length")
    heads = m.need("attention.head_count")
    kv = m.get("attention.head_count_kv", heads)
    head_dim = m.get("attention.key_length") or hidden // heads
    if m.get("attention.value_length", head_dim) != head_dim:
        raise UserError(f"{file}: {arch}.attention.value_length differs from key_length; not supported")
    if m.get("rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"{file}: {arch}.rope.dimension_count {m.get('rope.dimension_count')} differs from the head "
                        f"size {head_dim} (partial RoPE); not supported for architecture {arch!r}")
    eps = _f32(m.get("attention.layer_norm_rms_epsilon"))
    if eps is None:
        raise UserError(f"{file}: no {arch}.attention.layer_norm_rms_epsilon (RMSNorm); the file is incomplete")
    context = m.need("context_length")
    eos, pad, bos = _special(meta, "eos_token_id"), _special(meta, "padding_token_id"), _special(meta, "bos_token_id")
    causal = arch in _CAUSAL
    mask = _mask_id(meta, spec, causal, {i for i in (eos, pad, bos) if i is not None})
    common = {"rope_theta": _f32(m.get("rope.freq_base", 10000.0)), "rope_scaling": _rope_scaling(m, context),
              "vocab_size": vocab, "eos_token_id": eos, "pad_token_id": pad, "bos_token_id": bos,
              "mask_token_id": mask}
    qkv_bias = "blk.0.attn_q.bias" in tensors
    if arch == "llada":
        if head_dim * heads != hidden:
            raise UserError(f"{file}: a head size ({head_dim}) other than embedding_length / head_count is not "
                            "supported for architecture 'llada'")
        raw = {"model_type": model_type, "d_model": hidden, "n_layers": m.need("block_count"), "n_heads": heads,
               "n_kv_heads": kv, "mlp_hidden_size": m.need("feed_forward_length"), "max_sequence_length": context,
               "rms_norm_eps": eps, "weight_tying": "output.weight" not in tensors, "include_qkv_bias": qkv_bias,
               "embedding_size": vocab, **common}
    else:
        raw = {"model_type": model_type, "hidden_size": hidden, "num_hidden_layers": m.need("block_count"),
               "num_attention_heads": heads, "num_key_value_heads": kv,
               "intermediate_size": m.need("feed_forward_length"), "max_position_embeddings": context,
               "rms_norm_eps": eps, "tie_word_embeddings": "output.weight" not in tensors,
               "attention_bias": qkv_bias if arch == "llama" else False, **common}
        if arch == "qwen3" or head_dim * heads != hidden:
            raw["head_dim"] = head_dim
    raw = {k: v for k, v in raw.items() if v is not None}
    config_json = str(file / "config.json")
    try:
        cfg = spec.config_from_hf(raw, file)
    except UserError as e:
        raise UserError(str(e).replace(config_json, f"{file} (GGUF metadata)")) from None
    if d != cfg.d_model:
        raise UserError(f"{file}: tensor token_embd.weight has width {d} but {arch}.embedding_length is "
                        f"{cfg.d_model}; the metadata does not match the tensors")
    shift = meta.get("diffusion.shift_logits")
    if isinstance(shift, bool) and cfg.attention != "causal" and int(shift) != cfg.logit_shift:
        cfg = cfg.model_copy(update={"logit_shift": int(shift)})
    return cfg, spec, permuted


# ---- tokenizer ---------------------------------------------------------------------------------
def _pre_tokenizer(pre: str):
    """(normalizer, pre-tokenizer, ignore_merges) of the original tokenizer.json for `pre`."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    if pre == "gpt-2":
        return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return None, pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    if pre == "qwen2":
        return normalizers.NFC(), pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), False
    return None


def tokenizer_json(meta: dict, file: Path) -> str:
    """tokenizer.json text rebuilt from a GGUF file's `tokenizer.*` metadata (module docstring)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    model = meta.get("tokenizer.ggml.model")
    beside = "; or put the model's tokenizer.json beside the .gguf"
    if model != "gpt2":
        raise UserError(f"{file}: tokenizer.ggml.model {model!r} cannot be rebuilt (only 'gpt2', byte-level BPE)"
                        f"{beside}")
    pre = meta.get("tokenizer.ggml.pre") or "default"
    parts = _pre_tokenizer(pre)
    if parts is None:
        raise UserError(f"{file}: tokenizer.ggml.pre {pre!r} cannot be rebuilt exactly (supported: "
                        f"{', '.join(PRE_TOKENIZERS)}){beside}")
    normalizer, pre_tok, ignore_merges = parts
    tokens = meta.get("tokenizer.ggml.tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise UserError(f"{file}: no tokenizer.ggml.tokens or tokenizer.ggml.merges; the file has no vocabulary"
                        f"{beside}")
    types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise UserError(f"{file}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens; "
                        "the file is corrupt")
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if not (ty == UNUSED and t == f"[PAD{i}]")}
    pairs = []
    for entry in merges:
        a, sep, b = entry.partition(" ")
        if not sep or not a or not b or " " in b:
            raise UserError(f"{file}: tokenizer.ggml.merges entry {entry!r} is not 'left right'; the file is corrupt")
        pairs.append((a, b))
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges)
    except Exception as e:  # tokenizers raises plain Exception
        raise UserError(f"{file}: the GGUF vocabulary and merges do not form a BPE ({e}); the file is corrupt") \
            from None
    tok = Tokenizer(bpe)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    for i, (text, special) in sorted(_added_tokens(meta).items()):
        added = AddedToken(text, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([added])
        if tok.token_to_id(text) != i:
            raise UserError(f"{file}: token {text!r} appears twice in tokenizer.ggml.tokens; the file is corrupt")
    return tok.to_str()


def gguf_tokenizer(meta: dict, file: Path, cfg: ModelConfig, spec: FamilySpec):
    """The HFTokenizer of a GGUF file: tokenizer.json beside it, else rebuilt from the metadata."""
    from ..tokenizer import ChatTemplate, HFTokenizer

    tokens = meta.get("tokenizer.ggml.tokens") or []
    if (file.parent / "tokenizer.json").is_file():
        tok = HFTokenizer.from_dir(file.parent, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                                   pad_id=cfg.pad_token_id, end_token=spec.end_of_turn)
        types = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        for i, (t, ty) in enumerate(zip(tokens, types)):
            if ty != UNUSED and tok.token_of(i) != t:
                raise UserError(f"{file.parent / 'tokenizer.json'}: token {i} is {tok.token_of(i)!r} but {file.name} "
                                f"has {t!r}; that tokenizer.json belongs to another model, remove it or use the "
                                "model's own")
        return tok
    text = tokenizer_json(meta, file)
    ids = {t: i for i, t in enumerate(tokens)}

    def find(names) -> int | None:
        return next((ids[n] for n in names if n in ids), None)

    end = _special(meta, "eot_token_id")
    if end is None:
        end = find([spec.end_of_turn] if spec.end_of_turn else END_NAMES)
    fim = tuple(_special(meta, k) for k in ("fim_pre_token_id", "fim_suf_token_id", "fim_mid_token_id"))
    if None in fim:
        fim = next((tuple(ids[n] for n in names) for names in FIM_NAMES if all(n in ids for n in names)), None)
    bos = _special(meta, "bos_token_id")
    named = {"bos_token": bos, "eos_token": cfg.eos_token_id, "unk_token": _special(meta, "unknown_token_id"),
             "pad_token": _special(meta, "padding_token_id")}
    template_tokens = {k: tokens[i] for k, i in named.items() if i is not None and 0 <= i < len(tokens)}
    tpl = meta.get("tokenizer.chat_template")
    tpl = tpl if isinstance(tpl, str) and tpl else None
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", **template_tokens,
                  **({"chat_template": tpl} if tpl else {})}
    stops = [i for i in (_special(meta, "eot_token_id"), _special(meta, "eom_token_id")) if i is not None]
    return HFTokenizer(text, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id,
                       bos_id=bos, end_id=end, fim_ids=fim, extra_stop_ids=stops,
                       chat_template=ChatTemplate(tpl, f"{file} (tokenizer.chat_template)") if tpl else None,
                       template_tokens=template_tokens,
                       files={"tokenizer_config.json": json.dumps(tok_config, indent=2) + "\n"}, source=str(file))


# ---- loading -----------------------------------------------------------------------------------
def load_gguf(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a GGUF file (or the only .gguf of a directory without config.json).

    Returns (net in eval mode on `device` in `dtype`, its ModelConfig, the FamilySpec, an HFTokenizer,
    the metadata as a dict without the vocabulary-sized arrays: tokenizer.ggml.tokens, token_type,
    merges and scores). Anything wrong with the file is a one-line UserError naming it.
    """
    device = torch.device(device)
    file = find_gguf(path)
    if file is None:
        raise UserError(f"{path}: not a .gguf file, nor a directory holding one .gguf and no config.json")
    reader = _open(file)
    meta = read_metadata(reader, file)
    tensors = _Tensors(reader, file)
    cfg, spec, permuted = gguf_config(meta, tensors, file)
    with torch.device("meta"):
        net = Transformer(cfg)
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    wanted = {ours: NAMES.to_hf(ours) for ours in shapes}
    missing = [n for n in wanted.values() if n not in tensors]
    if missing:
        raise UserError(f"{file}: tensor {missing[0]} is missing but the GGUF metadata implies it; the file is "
                        "incomplete or its metadata does not match its tensors")
    extra = sorted(n for n in tensors.by_name if n not in wanted.values() and not n.endswith(_IGNORED))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"{file}: unexpected tensor {extra[0]}{more} that the metadata does not account for "
                        f"(architecture {meta.get('general.architecture')!r} as unmask reads it)")
    tensors.check_types(wanted.values())
    _check_memory(file, estimate_bytes(cfg, shapes, dtype), device)
    state: dict[str, torch.Tensor] = {}
    for ours, shape in shapes.items():
        t = tensors.get(wanted[ours], tuple(shape))
        heads = _heads_of(ours, cfg) if permuted else None
        if heads is not None:
            t = _unpermute(t, heads)
        state[ours] = _convert(ours, t, device, dtype)
        del t
    net.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        net.lm_head.weight = net.embed.weight
    net.reset_rope(device)
    tok = gguf_tokenizer(meta, file, cfg, spec)
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
    return net.eval(), cfg, spec, tok, {k: v for k, v in meta.items() if k not in big}


# ---- writing -----------------------------------------------------------------------------------
def _detect_pre(tj: dict, source: Path) -> str:
    """The tokenizer.ggml.pre name of a tokenizer.json whose pipeline is one we rebuild exactly."""
    pre, norm = tj.get("pre_tokenizer") or {}, tj.get("normalizer")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space") \
            and norm is None:
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex") and not steps[1].get("add_prefix_space"):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_SPLIT and norm is None:
            return "llama-bpe"
        if regex == _QWEN2_SPLIT and (norm or {}).get("type") == "NFC":
            return "qwen2"
    raise UserError(f"{source}: its pre-tokenizer is none that a GGUF file can name exactly (supported: GPT-2 "
                    "ByteLevel, Llama 3, Qwen2)")


def _vocab_metadata(src: Path, vocab_size: int) -> dict:
    from tokenizers import Tokenizer

    tj_file = src / "tokenizer.json"
    try:
        tj = json.loads(tj_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{tj_file}: cannot read it ({e})") from None
    if (tj.get("model") or {}).get("type") != "BPE":
        raise UserError(f"{tj_file}: only byte-level BPE tokenizers can be written to GGUF")
    tok = Tokenizer.from_str(json.dumps(tj))
    added = tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        text = tok.id_to_token(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(text)
            types.append((CONTROL if added[i].special else USER_DEFINED) if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    bos = None
    tc = src / "tokenizer_config.json"
    if tc.is_file():
        b = json.loads(tc.read_text(encoding="utf-8")).get("bos_token")
        b = b.get("content") if isinstance(b, dict) else b
        bos = tok.token_to_id(b) if isinstance(b, str) else None
    return {"pre": _detect_pre(tj, tj_file), "tokens": tokens, "types": types, "merges": merges, "bos": bos}


def _quantized(arr: np.ndarray, qtype):
    """(data, raw_dtype) as llama.cpp's converter stores a tensor for `qtype`: 1-D tensors stay F32,
    rows whose length the type's block does not divide fall back to F16."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if arr.ndim == 1 or qtype == q.F32:
        return arr.astype(np.float32), None
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if arr.shape[-1] % block:
        qtype = q.F16
    if qtype == q.F16:
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr, qtype), qtype


def write_gguf(src: str | os.PathLike, out: str | os.PathLike, qtype: str = "F16") -> Path:
    """Write the checkpoint directory `src` (families llama, qwen2, qwen3, llada, Dream) as a GGUF file
    laid out as llama.cpp's converter does (metadata keys, tensor names, q/k permutation for llama and
    llada, 1-D tensors in F32, byte-level BPE vocabulary). `qtype`: F32, F16, BF16, Q8_0, Q4_0, Q4_1,
    Q5_0 or Q5_1 (what gguf.quants can quantize). Written to a temporary name and renamed."""
    gguf = _gguf()
    src, out = Path(src), Path(out)
    try:
        gtype = gguf.GGMLQuantizationType[qtype.upper()]
    except KeyError:
        raise UserError(f"unknown GGUF type {qtype!r}") from None
    net, cfg, spec, raw = load_network(src)
    arch = next((a for a, (mt, _) in ARCHITECTURES.items() if mt in spec.model_types), None)
    if arch is None:
        raise UserError(f"{src}: family {spec.name} has no llama.cpp architecture; GGUF can hold: "
                        f"{', '.join(mt for mt, _ in ARCHITECTURES.values())}")
    permuted = ARCHITECTURES[arch][1]
    vocab = _vocab_metadata(src, cfg.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(src.name)
        w.add_block_count(cfg.n_layers)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_feed_forward_length(cfg.hidden)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        if cfg.head_size is not None:
            w.add_key_length(cfg.head_dim)
            w.add_value_length(cfg.head_dim)
        if arch in ("llama", "llada"):
            w.add_vocab_size(cfg.vocab_size)
            w.add_rope_dimension_count(cfg.head_dim)
        rs = cfg.rope_scaling
        if rs is not None:
            if rs.type not in ("linear", "yarn"):
                raise UserError(f"{src}: RoPE scaling {rs.type!r} has no GGUF form llama.cpp reads")
            w.add_rope_scaling_type(gguf.RopeScalingType(rs.type))
            w.add_rope_scaling_factor(rs.factor)
            if rs.type == "yarn":
                w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings or cfg.max_seq_len)
                w.add_rope_scaling_yarn_beta_fast(rs.beta_fast)
                w.add_rope_scaling_yarn_beta_slow(rs.beta_slow)
                if rs.attention_factor is not None:
                    w.add_rope_scaling_yarn_attn_factor(rs.attention_factor)
        if cfg.attention != "causal":
            w.add_causal_attention(False)
            w.add_mask_token_id(cfg.mask_token_id)
        if arch == "llada":
            w.add_diffusion_shift_logits(False)
            w.add_add_bos_token(True)
        ftype = "ALL_F32" if gtype == gguf.GGMLQuantizationType.F32 else f"MOSTLY_{gtype.name}"
        w.add_file_type(gguf.LlamaFileType[ftype])
        if gtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        w.add_token_merges(vocab["merges"])
        if vocab["bos"] is not None:
            w.add_bos_token_id(vocab["bos"])
        w.add_eos_token_id(cfg.eos_token_id)
        w.add_pad_token_id(cfg.pad_token_id)
        tpl = spec.chat_template(src)
        if tpl:
            w.add_chat_template(tpl)
        state = net.state_dict()
        for ours in state:
            if ours == "lm_head.weight" and cfg.tie_embeddings:
                continue
            t = state[ours].detach().float()
            heads = _heads_of(ours, cfg) if permuted else None
            if heads is not None:
                t = _permute(t, heads)
            data, raw_dtype = _quantized(t.numpy(), gtype)
            w.add_tensor(NAMES.to_hf(ours), data, raw_dtype=raw_dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


__all__ = ["ARCHITECTURES", "NAMES", "PRE_TOKENIZERS", "find_gguf", "gguf_config", "gguf_tokenizer", "load_gguf",
           "read_metadata", "tokenizer_json", "write_gguf"]
