"""`unmask convert SRC DST [--to FAMILY] [--dtype bf16|fp32|keep]`: any loadable model written in our
layout or in a registered family's Hugging Face layout.

SRC is anything `unmask.load` reads: our layout, a family's directory, a .gguf file. `--to` is a
registered model_type (`unmask.families.supported()`): `unmask` (our layout, the default), `llama`,
`qwen2`, `qwen3` (what transformers' `AutoModelForCausalLM` and llama.cpp's converter read), `llada`,
`sdar`, `Dream`, `Fast_dLLM_Qwen`, `llada2_moe`. The weights go through the source family's
`state_from_hf` into our tensor names, in their stored dtypes, then through the target's
`state_to_hf`; config.json is the target's `config_to_hf`. Nothing is converted through float32
unless asked, so with `--dtype keep` (the default) every tensor is written bit for bit as stored.

What a target can hold is decided by reading its config.json back: the target's `config_from_hf` of
what `config_to_hf` wrote must describe the same network (attention and block size, logit shift,
widths, norms, biases, RoPE, experts, vocabulary, special ids). A model the target reads differently
is refused with one line naming the first feature it cannot hold and the layouts that can. Exact
rewrites are made and said on stderr: `token_shift` of a causal model is dropped (its tables only
feed [MASK] inputs, which an AR model never sees), q/k/v biases a target always has (Qwen2, Dream,
Fast-dLLM v2) are written as zeros. Settings the network does not depend on are the target's: the
block size of a causal or full-attention model, the logit shift of a causal one, the family name.

Nothing is lost on a round trip through a foreign layout: its config.json also keeps, under the key
`unmask`, our ModelConfig and GenerationConfig of the source (Hugging Face configs keep unknown keys;
every family reader ignores them). Converting such a directory back restores the family, those
settings, the decoding defaults and, for our own models, our tokenizer, provided the record still
describes the network config.json does (else it is ignored, and said so).

Our layout (`--to unmask`) is what `pretrained.save` writes; config.json stays our strict
ModelConfig (no Hugging Face keys: `ModelConfig` forbids unknown fields, and no Hugging Face class
runs model_type "unmask" anyway). Its tokenizer files are Hugging Face's: tokenizer.json, and
tokenizer_config.json with the special tokens and the chat template, so `AutoTokenizer` reads every
directory written here. Foreign layouts also get generation_config.json in Hugging Face's format
(bos/eos/pad ids, the end-of-turn token among the eos ids, greedy or sampling).

Everything is written into a temporary directory beside DST and renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import GenerationConfig, ModelConfig, atomic_write_text
from .errors import UserError

UNMASK = "unmask"
RECORD_KEY = "unmask"  # where a foreign config.json keeps our configs (module docstring)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "keep": None}
_KEEP_FP32 = ("expert_bias",)  # routing biases stay float32 (as families/load.py loads them)
_RECOMPUTED = ("rotary_emb.inv_freq",)
_SHIFT_TABLES = ("prev_embed.weight", "gap_embed.weight")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


# ---- what a config means ---------------------------------------------------------------------------
def _semantics(c: ModelConfig) -> dict:
    """Everything the network's function and the meaning of its logits depend on, in the order a
    refusal names them. The block size of a causal or full model and a causal model's logit shift
    (always 1, decode.model_logit_shift) are decoding settings, not the network's."""
    from .decode import model_logit_shift

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


def _differences(ours: ModelConfig, theirs: ModelConfig, zero_bias_ok: bool = True) -> list[str]:
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
        from .decode import model_logit_shift
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


# ---- the source ------------------------------------------------------------------------------------
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


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point():
        t = t.to(torch.float32 if name.endswith(_KEEP_FP32) else dtype)
    # A slice of a fused tensor (LLaDA2's query_key_value) must not share its storage when written.
    return t.clone() if t._base is not None else t


def _dir_tensors(path: Path, cfg: ModelConfig, spec) -> Callable[[torch.dtype | None], dict]:
    """Our tensors of a checkpoint directory, as stored (or cast to `dtype`), checked as
    `families.load_network` checks them."""
    def read(dtype: torch.dtype | None) -> dict:
        from .families.checkpoint import CheckpointReader
        from .model import Transformer

        with torch.device("meta"):
            net = Transformer(cfg)
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        if cfg.tie_embeddings:
            shapes.pop("lm_head.weight", None)
        state: dict[str, torch.Tensor] = {}
        with CheckpointReader(path) as reader:
            for name, t in spec.state_from_hf(reader, cfg, shapes):
                if name not in shapes:
                    raise RuntimeError(f"{spec.name} adapter produced {name}, which the network does not have")
                if t.shape != shapes[name]:
                    raise UserError(f"{path}: tensor {name} has shape {tuple(t.shape)} but config.json implies "
                                    f"{tuple(shapes[name])}; config.json does not match the weights")
                state[name] = _cast(name, t, dtype)
            extra = [n for n in reader.unused() if not n.endswith(_RECOMPUTED)]
            if extra:
                more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
                raise UserError(f"{reader.file_of(extra[0])}: unexpected tensor {extra[0]}{more} that config.json "
                                "does not account for; config.json does not match the weights")
        missing = sorted(set(shapes) - set(state))
        if missing:
            raise RuntimeError(f"{spec.name} adapter did not produce {missing[:3]}")
        return state
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
    if _differences(adjusted, read, zero_bias_ok=False):
        return None
    # The same network: our own spelling of it (family, decoding block size, head_size None, ...).
    return ModelConfig.model_validate(adjusted.model_dump()), gen


def _open_source(src: str | os.PathLike) -> _Source:
    """The source's configs and tokenizer (its tensors are read later, once the target is checked)."""
    from . import families
    from .families.gguf import find_gguf
    from .pretrained import UNMASK_FAMILY, _our_generation, _our_tokenizer
    from .tokenizer import HFTokenizer

    path = Path(src)
    card = (path / "README.md").read_text(encoding="utf-8") if (path / "README.md").is_file() else None
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        from .families.gguf import load_gguf

        net, cfg, spec, tok, _ = load_gguf(gguf_file, dtype=torch.float32)
        state = {k: v for k, v in net.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
        gen = spec.generation_config(**({"block_size": cfg.block_size} if cfg.attention == "block" else {}))

        def read(dtype):
            return {k: _cast(k, v, dtype) for k, v in state.items()}
        return _Source(gguf_file, cfg, spec, "gguf", tok, gen, read)
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
                tok = _our_tokenizer(path, cfg) if family.name == UNMASK_FAMILY else \
                    HFTokenizer.from_dir(path, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                                         pad_id=cfg.pad_token_id, end_token=family.end_of_turn)
            except UserError:
                notes.append(f"{path / 'config.json'}: its {RECORD_KEY!r} record names family {cfg.family!r} "
                             "but the tokenizer files are not that family's; record ignored")
            else:
                return _Source(path, cfg, family, spec.model_types[0], tok, gen, read, _hf_gen(path), card)
            cfg = spec.config_from_hf(raw, path)
    family = families.get(cfg.family) if spec.name == UNMASK_FAMILY else spec
    if family.name == UNMASK_FAMILY:
        tok = _our_tokenizer(path, cfg)
    else:
        tok = HFTokenizer.from_dir(path, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                                   pad_id=cfg.pad_token_id, end_token=family.end_of_turn)
    if spec.name == UNMASK_FAMILY:
        gen, hf_gen = _our_generation(path, cfg), None
    else:
        gen = spec.generation_config(**({"block_size": cfg.block_size} if cfg.attention == "block" else {}))
        hf_gen = _hf_gen(path)
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
    from . import families

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
    return not _differences(cfg, back)


def _refuse(src: Path, cfg: ModelConfig, to: str, what: str, probe: Path) -> UserError:
    from . import families

    ok = [t for t in families.supported() if t != to and _fits(cfg, t, probe)]
    return UserError(f"{src}: cannot convert to {to!r}: {what}; layouts that can hold this model: {', '.join(ok)}")


def _plan(src: Path, cfg: ModelConfig, to: str, probe: Path) -> _Plan:
    from . import families

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
    diff = _differences(cfg, back)
    if diff:
        key = diff[0]
        raise _refuse(src, cfg, to, f"this model has {_feature(key, cfg)}, which a {to!r} checkpoint cannot hold "
                                    f"(it would read as {_feature(key, back)})", probe)
    zero = back.qkv_bias and not cfg.qkv_bias
    if zero:
        notes.append(f"a {to!r} checkpoint always has q/k/v biases: written as zeros (the same function)")
    return _Plan(back, hf, drop, zero, notes)


# ---- tokenizer files -------------------------------------------------------------------------------
def our_chat_template() -> str:
    """Our tokenizer's chat format (`Tokenizer.apply_chat_template`) as a Hugging Face Jinja template."""
    from .tokenizer import CHAT_ROLES, SPECIAL_TOKENS

    roles = ", ".join(repr(r) for r in CHAT_ROLES)
    end = SPECIAL_TOKENS["end"]
    return ("{%- for message in messages -%}"
            f"{{%- if message['role'] not in [{roles}] -%}}"
            "{{- raise_exception('unknown role ' + message['role'] + ': use system, user or assistant') -}}"
            "{%- endif -%}"
            f"{{{{- '<|' + message['role'] + '|>\\n' + message['content'] + '{end}\\n' -}}}}"
            "{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{- '{SPECIAL_TOKENS['assistant']}\\n' -}}}}{{%- endif -%}}")


def our_tokenizer_config(max_seq_len: int) -> dict:
    """tokenizer_config.json for our byte-level BPE (special ids 0..9, no BOS)."""
    from .tokenizer import SPECIAL_TOKENS

    named = {"eos", "mask", "pad"}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": SPECIAL_TOKENS["eos"],
        "pad_token": SPECIAL_TOKENS["pad"],
        "mask_token": SPECIAL_TOKENS["mask"],
        "additional_special_tokens": [t for k, t in SPECIAL_TOKENS.items() if k not in named],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_seq_len,
        "chat_template": our_chat_template(),
    }


def _write_tokenizer(tok, out: Path, cfg: ModelConfig, spec) -> None:
    """tokenizer.json plus tokenizer_config.json (special tokens, chat template) where `spec`'s
    loader and transformers look."""
    from .tokenizer import Tokenizer, find_chat_template

    tok.save(out / "tokenizer.json")
    if isinstance(tok, Tokenizer):
        atomic_write_text(out / "tokenizer_config.json", json.dumps(our_tokenizer_config(cfg.max_seq_len), indent=2)
                          + "\n")
        return
    # A foreign tokenizer's own files are written verbatim by `save`; fill in what is missing.
    tc_file = out / "tokenizer_config.json"
    tc = json.loads(tc_file.read_text(encoding="utf-8")) if tc_file.is_file() else None
    changed = tc is None
    if tc is None:
        tc = {"tokenizer_class": "PreTrainedTokenizerFast"}
        for key, i in (("eos_token", cfg.eos_token_id), ("pad_token", cfg.pad_token_id),
                       ("mask_token", cfg.mask_token_id), ("bos_token", getattr(tok, "bos_id", None))):
            if i is not None and tok.token_of(i) is not None:
                tc[key] = tok.token_of(i)
    template = getattr(tok, "chat_template", None)
    found = find_chat_template(out, tc) if spec.name == UNMASK else spec.chat_template(out)
    if template is not None and found is None:
        first = spec.chat_template_files[0] if spec.chat_template_files else "tokenizer_config.json"
        if first.endswith(".jinja"):
            atomic_write_text(out / first, template.source)
        else:
            tc["chat_template"] = template.source
            changed = True
    if changed:
        atomic_write_text(tc_file, json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def _tokenizer_notes(out: Path, to: str) -> list[str]:
    """transformers 5 reads a qwen2 directory's tokenizer as Qwen2's, whatever tokenizer.json says: its
    vocabulary and merges with Qwen2's own pre-tokenizer (and NFC)."""
    if to != "qwen2":
        return []
    from .families.gguf import _detect_pre

    try:
        pre = _detect_pre(json.loads((out / "tokenizer.json").read_text(encoding="utf-8")), out / "tokenizer.json")
    except (UserError, ValueError):
        pre = None
    if pre == "qwen2":
        return []
    return ["transformers 5 reads a 'qwen2' directory's tokenizer with Qwen2's pre-tokenizer, not this one's: "
            "its AutoTokenizer would split text differently (the weights are unaffected); llama and qwen3 "
            "directories keep tokenizer.json as it is"]


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


# ---- writing ---------------------------------------------------------------------------------------
def _check_dst(dst: Path, src: Path) -> None:
    if dst.suffix == ".gguf":
        raise UserError(f"{dst}: unmask convert writes checkpoint directories; for GGUF convert to llama (or qwen2, "
                        "qwen3) and run llama.cpp's convert_hf_to_gguf.py on that directory")
    if dst.exists() and not dst.is_dir():
        raise UserError(f"{dst}: exists and is not a directory; pick another destination")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "config.json").is_file() \
            and dst.resolve() != src.resolve():
        raise UserError(f"{dst}: exists and is not a model directory; it would be replaced, pick another destination")


def _publish(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing an old `out` (as pretrained.save does)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    for f in tmp.iterdir():
        os.chmod(f, 0o666 & ~umask)
    old = out.with_name(f".{out.name}.old")
    try:
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise


def _main_dtype(state: dict[str, torch.Tensor]) -> str:
    sizes: dict[torch.dtype, int] = {}
    for k, v in state.items():
        if v.is_floating_point() and not k.endswith(_KEEP_FP32):
            sizes[v.dtype] = sizes.get(v.dtype, 0) + v.numel()
    return _DTYPE_NAMES.get(max(sizes, key=sizes.get), "float32") if sizes else "float32"


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str = UNMASK, dtype: str = "keep",
            warn: Callable[[str], None] = _stderr) -> Path:
    """Write the model at `src` into `dst` in the layout of model_type `to` (module docstring); tensors
    as stored (`dtype` "keep") or as "bf16" / "fp32". Returns `dst`. A model `to` cannot hold, and any
    other user error, is a one-line UserError; exact rewrites are reported through `warn`."""
    from . import families
    from .pretrained import _write_shards

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    spec = families.get(to)
    src_path, out = Path(src), Path(dst)
    _check_dst(out, src_path)
    source = _open_source(src_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _write_tokenizer(source.tokenizer, tmp, source.cfg, spec)
        plan = _plan(source.path, source.cfg, to, tmp)
        notes = source.notes + plan.notes + _tokenizer_notes(tmp, to)
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
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in notes:
        warn(f"note: {note}")
    return out
