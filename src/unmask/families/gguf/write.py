"""`write_gguf(src_dir, out, qtype)`: a checkpoint directory of the families llama.cpp has an
architecture for, written as llama.cpp's converter lays it out (tests build GGUF fixtures with it)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from ...errors import UserError
from ..load import load_network
from .layout import ARCHITECTURES, NAMES, _heads_of, _permute, import_gguf
from .tokenizer import vocab_metadata


def _quantized(arr: np.ndarray, qtype):
    """(data, raw_dtype) as llama.cpp's converter stores a tensor for `qtype`: 1-D tensors stay F32,
    rows whose length the type's block does not divide fall back to F16."""
    gguf = import_gguf()
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
    src = Path(src)
    net, cfg, spec, raw = load_network(src)
    arch = next((a for a, (mt, _) in ARCHITECTURES.items() if mt in spec.model_types), None)
    if arch is None:
        raise UserError(f"{src}: family {spec.name} has no llama.cpp architecture; GGUF can hold: "
                        f"{', '.join(mt for mt, _ in ARCHITECTURES.values())}")
    return write_gguf_net(net.state_dict(), cfg, out, qtype, arch=arch, vocab=vocab_metadata(src, cfg.vocab_size),
                          name=src.name, chat_template=spec.chat_template(src), where=str(src))


def write_gguf_net(state: dict, cfg, out: str | os.PathLike, qtype: str = "F16", *, arch: str, vocab: dict | None,
                   name: str, chat_template: str | None = None, where: str = "model") -> Path:
    """The in-memory half of write_gguf: a state dict in our names and its ModelConfig, as a GGUF file
    of llama.cpp architecture `arch` (a key of ARCHITECTURES). Tensors the architecture has no name
    for must be dropped by the caller. vocab None: no tokenizer ("no_vocab"; the engine's llama.cpp
    runner feeds embeddings and reads logits). Atomic."""
    gguf = import_gguf()
    out = Path(out)
    try:
        gtype = gguf.GGMLQuantizationType[qtype.upper()]
    except KeyError:
        raise UserError(f"unknown GGUF type {qtype!r}") from None
    permuted = ARCHITECTURES[arch][1]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name)
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
                raise UserError(f"{where}: RoPE scaling {rs.type!r} has no GGUF form llama.cpp reads")
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
        if vocab is None:  # ids in, logits out (the engine's llama.cpp runner): no tokenizer needed
            w.add_tokenizer_model("no_vocab")
            if arch not in ("llama", "llada"):
                w.add_vocab_size(cfg.vocab_size)
        else:
            w.add_tokenizer_model("gpt2")
            w.add_tokenizer_pre(vocab["pre"])
            w.add_token_list(vocab["tokens"])
            w.add_token_types(vocab["types"])
            w.add_token_merges(vocab["merges"])
            if vocab["bos"] is not None:
                w.add_bos_token_id(vocab["bos"])
            w.add_eos_token_id(cfg.eos_token_id)
            w.add_pad_token_id(cfg.pad_token_id)
        if chat_template:
            w.add_chat_template(chat_template)
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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the temporary name, not the result
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
