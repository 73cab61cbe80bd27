"""GGUF files (unmask.families.gguf): fixtures written with gguf.GGUFWriter from safetensors checkpoints
(our tiny family checkpoints and, when present, the shared dLLM fixtures), read back and compared with
the safetensors load; the tokenizer rebuilt from GGUF metadata against tokenizer.json; llama.cpp's q/k
permutation against RoPE itself; and the errors.

Measured on the tiny checkpoints (fp32 weights N(0, 0.3), logits up to ~33), GGUF vs safetensors logits:
F32 0 (bit-exact); F16 max |diff| <= 7.8e-2, relative (L2) <= 2.8e-3; Q8_0 max <= 1.6, relative
<= 6.4e-2 (these random models amplify weight error; a Q8_0 load equals (measured: exactly) the
safetensors model with each weight quantised and dequantised by gguf.quants). Shared fixtures (bf16
weights, logits ~1): F32 and F16 <= 4.8e-7 against the families' reference logits, Q8_0 max 1.4e-2,
relative <= 1.3e-2.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from safetensors.torch import load_file  # noqa: E402

from unmask.errors import UserError  # noqa: E402
from unmask.families import load_network  # noqa: E402
from unmask.families.gguf import (ARCHITECTURES, _permute, _unpermute, find_gguf, load_gguf,  # noqa: E402
                                  write_gguf)
from unmask.families.tiny import write_tiny  # noqa: E402
from unmask.tokenizer import HFTokenizer  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "families"
FAMILIES = ["llama", "qwen2", "qwen3", "llada", "Dream"]  # our families llama.cpp has an architecture for
# GGUF vs safetensors logits (see the module docstring for what was measured)
F32_TOL = 1e-5
F16_REL, F16_MAX = 1e-2, 0.25
Q8_REL = 0.15
TEXTS = ["def add(a, b):\n    return a + b\n", "Héllo wörld  \t\n\n  x = 12345 # ünïcödé 你好 🚀",
         "I'VE been 'told' he's THERE, we'Ll see", "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "",
         "   leading and trailing   ", "e\u0301 café ﬁ ①②", "\r\n\r\n\tx\u00a0y 3.14159 1,000,000"]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """model_type -> a tiny checkpoint directory with fp32 weights (so F16 and Q8_0 lose something)."""
    root = tmp_path_factory.mktemp("tiny")
    return {mt: write_tiny(mt, root / mt, dtype=torch.float32)[0] for mt in FAMILIES}


def _logits(net, x):
    with torch.no_grad():
        return net(x)


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---- weights ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_gguf_logits_match_safetensors(model_type, tiny, tmp_path):
    src = tiny[model_type]
    ref, ref_cfg, ref_spec, _ = load_network(src)
    x = torch.randint(0, ref_cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    y0 = _logits(ref, x)
    for qtype in ("F32", "F16", "Q8_0"):
        file = write_gguf(src, tmp_path / f"{qtype}.gguf", qtype)
        net, cfg, spec, tok, meta = load_gguf(file)
        assert cfg == ref_cfg and spec is ref_spec
        assert meta["general.architecture"] in ARCHITECTURES and "tokenizer.ggml.tokens" not in meta
        y = _logits(net, x)
        diff, rel = (y - y0).abs().max().item(), _rel(y, y0)
        print(f"{model_type} {qtype}: max |diff| {diff:.2e}, relative {rel:.2e}")
        if qtype == "F32":
            assert diff <= F32_TOL
        elif qtype == "F16":
            assert rel <= F16_REL and diff <= F16_MAX
        else:
            assert rel <= Q8_REL
            assert (y.argmax(-1) == y0.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_q8_0_load_is_the_dequantised_weights(model_type, tiny, tmp_path):
    """A Q8_0 file loads exactly as the safetensors model with each quantised weight put through
    gguf.quants (rows are quantised along the input dimension, so the q/k row permutation commutes)."""
    src = tiny[model_type]
    ref, cfg, _, _ = load_network(src)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 2 and p.shape[1] % 32 == 0:
                q8 = gguf.quants.quantize(p.detach().numpy(), gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)))
            elif p.dim() == 2:  # the converter's fallback for rows Q8_0 cannot hold
                p.copy_(p.half().float())
    net, *_ = load_gguf(write_gguf(src, tmp_path / "q8.gguf", "Q8_0"))
    x = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    assert (_logits(net, x) - _logits(ref, x)).abs().max().item() <= 1e-4


def test_bf16_and_dtype_and_lazy_conversion(tiny, tmp_path):
    src = tiny["qwen2"]
    ref, cfg, _, _ = load_network(src)
    file = write_gguf(src, tmp_path / "bf16.gguf", "BF16")
    net, cfg2, *_ = load_gguf(file, dtype=torch.bfloat16)
    assert cfg2 == cfg and net.embed.weight.dtype == torch.bfloat16
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])
    with torch.no_grad():
        assert torch.equal(net.embed.weight, ref.embed.weight.bfloat16())  # BF16 in, BF16 out: exact


def _wide_llama(tmp_path) -> Path:
    """A one-layer llama checkpoint 256 wide (K-quant rows hold 256 values), tokenizer from write_tiny."""
    from safetensors.torch import save_file

    from unmask.config import ModelConfig
    from unmask.families.llama import LLAMA
    from unmask.model import Transformer

    small, ref = write_tiny("llama", tmp_path / "small")
    c = ref.config
    cfg = ModelConfig(family="llama", d_model=256, n_layers=1, n_heads=4, n_kv_heads=2, mlp_hidden=256,
                      max_seq_len=64, tie_embeddings=False, attention="causal", objective="ar", block_size=32,
                      vocab_size=c.vocab_size, mask_token_id=c.mask_token_id, eos_token_id=c.eos_token_id,
                      pad_token_id=c.pad_token_id)
    torch.manual_seed(0)
    net = Transformer(cfg)
    out = tmp_path / "wide"
    out.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(small / f, out / f)
    (out / "config.json").write_text(json.dumps(LLAMA.config_to_hf(cfg)))
    save_file({k: v.contiguous() for k, v in LLAMA.state_to_hf(net.state_dict(), cfg).items()},
              out / "model.safetensors")
    return out


def test_k_quants_dequantise_through_the_permutation(tmp_path):
    """Q4_K / Q6_K tensors (which gguf.quants reads but cannot write) load as gguf.quants.dequantize
    reads them, with llama's q/k row permutation undone afterwards."""
    src = _wide_llama(tmp_path)
    f32 = write_gguf(src, tmp_path / "f32.gguf", "F32")
    cfg = load_network(src)[1]
    rng = np.random.default_rng(0)
    Q = gguf.GGMLQuantizationType
    kinds = {"blk.0.attn_q.weight": Q.Q6_K, "blk.0.attn_k.weight": Q.Q4_K, "blk.0.ffn_up.weight": Q.Q4_K}
    expected = {}

    def kquant(name, t):
        if name not in kinds:
            return None
        qt = kinds[name]
        rows, cols = t.data.shape
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
        scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
        if qt == Q.Q6_K:
            raw[:, -2:] = scale  # d, the block scale, is last
        else:
            raw[:, 0:2] = scale  # d, then dmin, first
            raw[:, 2:4] = scale
        raw = raw.reshape(rows, cols // block * size)
        expected[name] = torch.from_numpy(gguf.quants.dequantize(raw, qt).copy())
        return raw, qt

    net, *_ = load_gguf(_rewrite(f32, tmp_path / "k.gguf", tensor_hook=kquant))
    assert set(expected) == set(kinds)
    attn = net.layers[0].attn
    assert torch.equal(attn.q_proj.weight, _unpermute(expected["blk.0.attn_q.weight"], cfg.n_heads))
    assert torch.equal(attn.k_proj.weight, _unpermute(expected["blk.0.attn_k.weight"], cfg.kv_heads))
    assert torch.equal(net.layers[0].mlp.up_proj.weight, expected["blk.0.ffn_up.weight"])
    assert torch.isfinite(_logits(net, torch.tensor([[3, 4, 5, 6]]))).all()


# ---- llama.cpp's q/k permutation, checked against RoPE itself ----------------------------------------
def _rope_rotate_half(x, pos, base):  # Hugging Face (and our) pairing: j with j + d/2
    d = x.shape[-1]
    theta = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * theta.cos() - x2 * theta.sin(), x1 * theta.sin() + x2 * theta.cos()], -1)


def _rope_interleaved(x, pos, base):  # llama.cpp's "normal" RoPE (llama, llada): pairs (2i, 2i + 1)
    d = x.shape[-1]
    theta = pos * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * theta.cos() - b * theta.sin()
    out[..., 1::2] = a * theta.sin() + b * theta.cos()
    return out


def test_permutation_turns_rotate_half_into_interleaved_rope():
    """The converter's row permutation makes llama.cpp's interleaved RoPE on the permuted projection
    equal (up to the same permutation) HF's rotate-half RoPE on the original, so q.k is unchanged;
    `_unpermute` is its inverse."""
    torch.manual_seed(0)
    heads, hd, d_in = 3, 8, 5
    w = torch.randn(heads * hd, d_in, dtype=torch.float64)
    x = torch.randn(d_in, dtype=torch.float64)
    for pos in (0, 1, 7, 100):
        hf = _rope_rotate_half((w @ x).view(heads, hd), pos, 10000.0)
        cpp = _rope_interleaved((_permute(w, heads) @ x).view(heads, hd), pos, 10000.0)
        torch.testing.assert_close(cpp.reshape(-1), _permute(hf.reshape(-1, 1), heads).reshape(-1))
        k = torch.randn(heads * hd, d_in, dtype=torch.float64)
        hf_k = _rope_rotate_half((k @ x).view(heads, hd), pos + 3, 10000.0)
        cpp_k = _rope_interleaved((_permute(k, heads) @ x).view(heads, hd), pos + 3, 10000.0)
        torch.testing.assert_close((hf * hf_k).sum(-1), (cpp * cpp_k).sum(-1))
    assert torch.equal(_unpermute(_permute(w, heads), heads), w)
    assert not torch.equal(_permute(w, heads), w)


# ---- shared dLLM fixtures --------------------------------------------------------------------------
# fixture dir -> GGUF architecture (the families llama.cpp has: LLaDA and Dream)
SHARED = {"llada-tiny": "llada", "dream-tiny": "dream"}


def shared(name: str) -> Path:
    d = FIXTURES / name
    if not (d / "reference_logits.safetensors").exists():
        pytest.skip(f"fixture {d} is not available")
    return d


@pytest.mark.parametrize("name", list(SHARED))
def test_shared_fixtures_through_gguf(name, tmp_path):
    src = shared(name)
    ref = load_file(src / "reference_logits.safetensors")
    _, ref_cfg, spec, _ = load_network(src)
    for qtype in ("F32", "F16", "Q8_0"):
        net, cfg, spec2, tok, meta = load_gguf(write_gguf(src, tmp_path / f"{qtype}.gguf", qtype))
        assert meta["general.architecture"] == SHARED[name] and meta[f"{SHARED[name]}.attention.causal"] is False
        assert cfg == ref_cfg and spec2 is spec
        y = _logits(net, ref["input_ids"])
        diff, rel = (y - ref["logits"]).abs().max().item(), _rel(y, ref["logits"])
        print(f"{name} {qtype}: max |diff| {diff:.2e}, relative {rel:.2e}")
        assert (diff <= 1e-4) if qtype != "Q8_0" else (rel <= 0.05)
    # the tokenizer rebuilt from the metadata is the fixture's tokenizer.json
    orig = HFTokenizer.from_dir(src, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id,
                                pad_id=cfg.pad_token_id, end_token=spec.end_of_turn)
    _same_tokenizer(tok, orig)
    msgs = [{"role": "user", "content": "Write add(a, b)."}]
    assert tok.apply_chat_template(msgs) == orig.apply_chat_template(msgs)
    assert tok.encode_chat(msgs) == orig.encode_chat(msgs)


def _same_tokenizer(tok, orig):
    assert tok.special_ids == orig.special_ids
    assert tok.vocab_size == orig.vocab_size
    for text in TEXTS:
        for allow in (True, False):
            assert tok.encode(text, allow_special=allow) == orig.encode(text, allow_special=allow), (text, allow)
        ids = orig.encode(text)
        assert tok.decode(ids) == orig.decode(ids)
        assert tok.decode(ids, skip_special=True) == orig.decode(ids, skip_special=True)


# ---- tokenizer ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", FAMILIES)
def test_tokenizer_rebuilt_from_metadata_is_tokenizer_json(model_type, tiny, tmp_path):
    src = tiny[model_type]
    net, cfg, spec, tok, meta = load_gguf(write_gguf(src, tmp_path / "m.gguf", "F32"))
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    orig = HFTokenizer.from_dir(src, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id,
                                end_token=spec.end_of_turn)
    _same_tokenizer(tok, orig)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == orig.apply_chat_template(msgs)
    out = tmp_path / "saved"
    out.mkdir()
    tok.save(out)  # a usable Hugging Face tokenizer directory
    again = HFTokenizer.from_dir(out, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)
    _same_tokenizer(again, orig)


def _retokenize(src: Path, build) -> None:
    """Replace src/tokenizer.json by one with the same vocabulary, merges and added tokens but the
    pipeline `build(vocab, merges)` makes (a transformers tokenizer class)."""
    from tokenizers import AddedToken, Tokenizer

    old = Tokenizer.from_file(str(src / "tokenizer.json"))
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = old.get_vocab(with_added_tokens=True)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tj["model"]["merges"]]
    new = build(vocab, merges)
    added = old.get_added_tokens_decoder()
    new.add_special_tokens([AddedToken(t.content, special=True, normalized=False)
                            for _, t in sorted(added.items()) if t.special])
    assert all(new.token_to_id(t.content) == i for i, t in added.items())
    (src / "tokenizer.json").write_text(new.to_str())


def _qwen2_pipeline(vocab, merges):
    from transformers import Qwen2Tokenizer
    return Qwen2Tokenizer(vocab=vocab, merges=list(merges)).backend_tokenizer


def _llama3_pipeline(vocab, merges):
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class FromVocab(TikTokenConverter):  # transformers' Llama 3 (tiktoken) conversion, on our vocabulary
        def tokenizer(self):
            return Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))

    return FromVocab().converted()


@pytest.mark.parametrize("model_type,pipeline,pre", [("qwen2", _qwen2_pipeline, "qwen2"),
                                                     ("llama", _llama3_pipeline, "llama-bpe")])
def test_llama3_and_qwen2_pre_tokenizers_rebuild_exactly(model_type, pipeline, pre, tmp_path):
    pytest.importorskip("transformers")
    src, _ = write_tiny(model_type, tmp_path / "src")
    _retokenize(src, pipeline)
    net, cfg, spec, tok, meta = load_gguf(write_gguf(src, tmp_path / "m.gguf", "F16"))
    assert meta["tokenizer.ggml.pre"] == pre
    orig = HFTokenizer.from_dir(src, mask_id=cfg.mask_token_id, eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id,
                                end_token=spec.end_of_turn)
    # the pipeline is the one asked for: Qwen2 normalises to NFC, Llama 3 does not
    assert (orig.encode("e\u0301") == orig.encode("\u00e9")) == (pre == "qwen2")
    _same_tokenizer(tok, orig)


def test_tokenizer_json_beside_the_gguf_wins(tiny, tmp_path):
    src = tiny["Dream"]
    d = tmp_path / "dir"
    file = write_gguf(src, d / "model.gguf", "F16")
    shutil.copy(src / "tokenizer.json", d / "tokenizer.json")
    shutil.copy(src / "tokenizer_config.json", d / "tokenizer_config.json")
    *_, tok, _ = load_gguf(d)  # a directory with one .gguf and no config.json
    assert tok.to_str() == (src / "tokenizer.json").read_text()
    shutil.copy(tiny["qwen3"] / "tokenizer.json", d / "tokenizer.json")  # another model's vocabulary
    (d / "tokenizer_config.json").unlink()
    with pytest.raises(UserError) as e:
        load_gguf(file)
    assert "belongs to another model" in one_line(e) and "tokenizer.json" in str(e.value)


# ---- unmask.load -----------------------------------------------------------------------------------
def test_pretrained_load_dispatches_gguf(tiny, tmp_path):
    import unmask

    src = tiny["qwen3"]
    hf = unmask.load(src)
    file = write_gguf(src, tmp_path / "one" / "qwen3.gguf", "F32")
    for path in (file, file.parent):
        model = unmask.load(path)
        assert model.config == hf.config and model.family is hf.family and model.generation == hf.generation
        x = [[5, 17, 42, 8, 99]]
        torch.testing.assert_close(model.logits(x), hf.logits(x), atol=F32_TOL, rtol=0)
        assert model.tokenizer.encode(TEXTS[1]) == hf.tokenizer.encode(TEXTS[1])
        assert model.tokenizer.stop_ids == hf.tokenizer.stop_ids
    assert find_gguf(src) is None  # a checkpoint directory (config.json) stays one
    shutil.copy(file, file.parent / "copy.gguf")
    with pytest.raises(UserError) as e:
        unmask.load(file.parent)
    assert "2 .gguf files" in one_line(e)


# ---- errors ----------------------------------------------------------------------------------------
_VALUE = gguf.GGUFValueType


def _rewrite(src: Path, dst: Path, *, changes: dict | None = None, tensor_hook=None,
             extra_tensors: dict | None = None) -> Path:
    """Copy a GGUF file with `changes` to its metadata (key -> new value; None drops the key, a key the
    file lacks is added), `tensor_hook(name, tensor)` replacing tensors (it returns (data, raw_dtype),
    or None to keep one) and `extra_tensors` added."""
    changes = dict(changes or {})
    r = gguf.GGUFReader(src)
    arch = changes.get("general.architecture", r.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(dst, arch)
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = changes[key] if key in changes else field.contents()
        if value is None:
            continue
        sub = field.types[-1] if field.types[0] == _VALUE.ARRAY else None
        w.add_key_value(key, value, field.types[0], sub_type=sub)
    for key, value in changes.items():
        if key not in r.fields and key != "general.architecture" and value is not None:
            w.add_key_value(key, value, _VALUE.STRING if isinstance(value, str) else _VALUE.UINT32)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    for t in r.tensors:
        new = tensor_hook(t.name, t) if tensor_hook is not None else None
        if new is None:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=None if t.tensor_type in plain else t.tensor_type)
        else:
            w.add_tensor(t.name, new[0], raw_dtype=new[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("arch", ["llada-moe", "gpt2"])
def test_unsupported_architecture(arch, tiny, tmp_path):
    f32 = write_gguf(tiny["llada"], tmp_path / "m.gguf", "F32")
    file = _rewrite(f32, tmp_path / f"{arch}.gguf", changes={"general.architecture": arch})
    with pytest.raises(UserError) as e:
        load_gguf(file)
    msg = one_line(e)
    assert f"{arch}.gguf" in msg and repr(arch) in msg and "supported: llama, qwen2, qwen3, llada, dream" in msg


def test_unsupported_quantisation_type(tiny, tmp_path):
    f32 = write_gguf(tiny["llama"], tmp_path / "m.gguf", "F32")

    def q8_1(name, t):
        if name != "blk.1.ffn_down.weight":
            return None
        rows, cols = t.data.shape
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
        return np.zeros((rows, cols // block * size), dtype=np.uint8), gguf.GGMLQuantizationType.Q8_1

    file = _rewrite(f32, tmp_path / "q8_1.gguf", tensor_hook=q8_1)
    with pytest.raises(UserError) as e:
        load_gguf(file)
    msg = one_line(e)
    assert "q8_1.gguf" in msg and "blk.1.ffn_down.weight" in msg and "Q8_1" in msg
    assert "supported:" in msg and "Q8_0" in msg and "Q4_K" in msg and "F16" in msg


def test_truncated_and_corrupt_files(tiny, tmp_path):
    file = write_gguf(tiny["qwen2"], tmp_path / "m.gguf", "Q8_0")
    data = file.read_bytes()
    for cut in (16, 2000, len(data) // 2, len(data) - 200):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError) as e:
            load_gguf(bad)
        assert f"cut{cut}.gguf" in one_line(e) and "truncated or corrupt" in str(e.value)
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + data[4:])
    with pytest.raises(UserError) as e:
        load_gguf(bad)
    assert "magic.gguf" in one_line(e)
    with pytest.raises(UserError) as e:
        load_gguf(tmp_path / "absent.gguf")
    assert "not found" in one_line(e)


def test_metadata_errors(tiny, tmp_path):
    f32 = write_gguf(tiny["llama"], tmp_path / "m.gguf", "F32")
    cases = {
        "pre": ({"tokenizer.ggml.pre": "deepseek-coder"}, "tokenizer.ggml.pre 'deepseek-coder'"),
        "model": ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model 'llama'"),
        "heads": ({"llama.attention.head_count_kv": 4},
                  "tensor blk.0.attn_k.weight has shape (32, 64) but the GGUF metadata implies (64, 64)"),
        "missing": ({"llama.block_count": None}, "llama.block_count is missing"),
        "scaling": ({"llama.rope.scaling.type": "longrope"}, "'longrope' is not supported"),
        "split": ({"split.count": 3}, "split GGUF"),
    }
    for tag, (changes, expect) in cases.items():
        file = _rewrite(f32, tmp_path / f"{tag}.gguf", changes=changes)
        with pytest.raises(UserError) as e:
            load_gguf(file)
        assert expect in one_line(e) and f"{tag}.gguf" in str(e.value), (tag, str(e.value))


def test_llama3_rope_freqs_tensor_is_refused(tiny, tmp_path):
    f32 = write_gguf(tiny["llama"], tmp_path / "m.gguf", "F32")
    file = _rewrite(f32, tmp_path / "l3.gguf", extra_tensors={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    with pytest.raises(UserError) as e:
        load_gguf(file)
    assert "rope_freqs.weight" in one_line(e) and "l3.gguf" in str(e.value)


def test_write_gguf_refuses_families_without_a_llamacpp_architecture(tmp_path):
    src, _ = write_tiny("sdar", tmp_path / "sdar")
    with pytest.raises(UserError) as e:
        write_gguf(src, tmp_path / "s.gguf")
    assert "SDAR" in one_line(e) and "llama.cpp" in str(e.value)
    assert not (tmp_path / "s.gguf").exists()
