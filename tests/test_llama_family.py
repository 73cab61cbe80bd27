"""Plain AR Hugging Face families (unmask.families.llama): Llama, Qwen2, Qwen3. Parity with
transformers' own modeling code, our causal models written as a directory transformers loads, the
placeholder [MASK] id, and the config fields refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from unmask.errors import UserError
from unmask.families import get, load_network
from unmask.families.llama import LLAMA, QWEN2, QWEN3, placeholder_mask_id
from unmask.families.tiny import write_tiny

AR = ["llama", "qwen2", "qwen3"]
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _edit_config(d: Path, **changes) -> None:
    raw = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    (d / "config.json").write_text(json.dumps(raw))


def _transformers_logits(d: Path, x: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(x).logits


@pytest.mark.parametrize("model_type", AR)
def test_tiny_checkpoint_matches_transformers(model_type, tmp_path):
    out, ref = write_tiny(model_type, tmp_path / model_type, dtype=torch.float32)
    net, cfg, spec, raw = load_network(out)
    assert spec.model_types == (model_type,) and cfg == ref.config
    assert cfg.attention == "causal" and cfg.objective == "ar" and cfg.family == model_type
    x = torch.randint(0, cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = net(x)
    diff = (ours - _transformers_logits(out, x)).abs().max().item()
    print(f"{model_type}: transformers vs unmask fp32 max |diff| {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("spec", [LLAMA, QWEN2, QWEN3], ids=lambda s: s.name)
def test_our_causal_model_converts_to_a_transformers_directory(spec, tok, tmp_path):
    """An unmask AR model (token_shift on: its [MASK]-only tables are dropped) written with
    config_to_hf/state_to_hf loads in transformers and in unmask with the same logits."""
    from conftest import random_pretrained

    overrides = {"qk_norm": True, "head_size": 16} if spec is QWEN3 else {}
    model = random_pretrained(tok, "causal", token_shift=True, tie_embeddings=spec is not QWEN2, **overrides)
    cfg = model.config
    out = tmp_path / spec.name
    out.mkdir()
    state = {k: v.contiguous() for k, v in spec.state_to_hf(model.net.state_dict(), cfg).items()}
    assert not any("prev_embed" in k or "gap_embed" in k for k in state)
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(spec.config_to_hf(cfg)))
    tok.save(out / "tokenizer.json")
    # inputs without [MASK]: an AR model never sees one, so the dropped tables change nothing
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (2, 30), generator=g)
    x[x == cfg.mask_token_id] = 100
    with torch.no_grad():
        ours = model.net(x)
    assert (ours - _transformers_logits(out, x)).abs().max().item() < TOL
    net, cfg2, spec2, _ = load_network(out)
    assert spec2 is spec and cfg2.family == spec.model_types[0] and not cfg2.token_shift
    assert (cfg2.mask_token_id, cfg2.eos_token_id, cfg2.pad_token_id) == (cfg.mask_token_id, cfg.eos_token_id,
                                                                          cfg.pad_token_id)
    with torch.no_grad():
        assert (net(x) - ours).abs().max().item() < 1e-5


def test_config_to_hf_refuses_what_the_family_cannot_hold(make_config):
    block = make_config(attention="block", vocab_size=300)
    with pytest.raises(UserError) as e:
        LLAMA.config_to_hf(block)
    assert "'block' attention" in one_line(e) and "'llama'" in str(e.value)
    normed = make_config(attention="causal", qk_norm=True, vocab_size=300)
    with pytest.raises(UserError) as e:
        LLAMA.config_to_hf(normed)
    assert "q/k norms" in one_line(e) and "qwen3" in str(e.value)
    with pytest.raises(UserError) as e:
        QWEN3.config_to_hf(make_config(attention="causal", vocab_size=300))
    assert "no q/k norms" in one_line(e)
    with pytest.raises(UserError) as e:
        LLAMA.config_to_hf(make_config(attention="causal", qkv_bias=True, vocab_size=300))
    assert "biases" in one_line(e) and "qwen2" in str(e.value)
    assert QWEN2.config_to_hf(make_config(attention="causal", vocab_size=300))["model_type"] == "qwen2"


def test_qwen2_without_biases_gets_zero_biases(make_config):
    cfg = make_config(attention="causal", vocab_size=300)
    from unmask.model import Transformer
    state = QWEN2.state_to_hf(Transformer(cfg).state_dict(), cfg)
    bias = state["model.layers.1.self_attn.k_proj.bias"]
    assert bias.shape == (cfg.kv_heads * cfg.head_dim,) and not bias.any()


def test_registry_knows_the_ar_families():
    assert get("llama") is LLAMA and get("qwen2") is QWEN2 and get("qwen3") is QWEN3


# ---- config.json variants ------------------------------------------------------------------------------
def test_transformers5_rope_parameters_are_read(tmp_path):
    out, ref = write_tiny("llama", tmp_path / "m")
    _edit_config(out, rope_theta=None, rope_scaling=None,
                 rope_parameters={"rope_type": "default", "rope_theta": ref.config.rope_theta})
    assert load_network(out)[1] == ref.config
    _edit_config(out, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0})
    cfg = load_network(out)[1]
    assert cfg.rope_theta == 1000.0 and cfg.rope_scaling.type == "linear" and cfg.rope_scaling.factor == 2.0


def test_qwen3_head_dim_defaults_to_128(tmp_path):
    out, _ = write_tiny("qwen3", tmp_path / "m")
    _edit_config(out, head_dim=None)  # Qwen3Config's default is 128, not hidden_size / heads
    with pytest.raises(UserError) as e:
        load_network(out)
    assert "(512, 64)" in one_line(e)  # q_proj: 4 heads x 128


def test_unsupported_fields_are_refused(tmp_path):
    out, _ = write_tiny("llama", tmp_path / "m")
    for field, value, expect in (("attention_bias", True, "attention_bias"), ("mlp_bias", True, "mlp_bias"),
                                 ("rope_scaling", {"rope_type": "longrope", "factor": 8.0}, "'longrope'"),
                                 ("hidden_act", "gelu", "hidden_act")):
        d = tmp_path / field
        d.mkdir()
        for f in out.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        _edit_config(d, **{field: value})
        with pytest.raises(UserError) as e:
            load_network(d)
        assert expect in one_line(e) and "config.json" in str(e.value)


# ---- the placeholder [MASK] ---------------------------------------------------------------------------
def test_placeholder_mask_rules():
    added = {0: ("<unk>", True), 1: ("<s>", True), 2: ("</s>", True)}
    assert placeholder_mask_id(added, {1, 2}) == 0  # Llama 2: <unk>
    added = {128000: ("<|begin_of_text|>", True), 128001: ("<|end_of_text|>", True),
             128002: ("<|reserved_special_token_0|>", True), 128009: ("<|eot_id|>", True)}
    assert placeholder_mask_id(added, {128000, 128001}) == 128002  # Llama 3: a reserved token
    added = {151643: ("<|endoftext|>", True), 151644: ("<|im_start|>", True), 151645: ("<|im_end|>", True),
             151659: ("<|fim_prefix|>", False), 151662: ("<|fim_pad|>", False), 151664: ("<|file_sep|>", False)}
    assert placeholder_mask_id(added, {151643}) == 151662  # Qwen2.5: a pad-like token that is not the pad
    added = {5: ("<a>", True), 6: ("<b>", True), 7: ("<c>", False)}
    assert placeholder_mask_id(added, set(), template="{{ '<b>' }}") == 5  # not written by the template
    assert placeholder_mask_id({5: ("<|mask|>", True), 9: ("<|reserved_0|>", True)}, set()) == 5
    assert placeholder_mask_id({0: ("<|endoftext|>", True)}, {0}) is None


def test_mask_id_without_config_field(tmp_path):
    out, ref = write_tiny("qwen2", tmp_path / "m")
    _edit_config(out, mask_token_id=None)  # a real Qwen2 config: found among the tokenizer's added tokens
    assert load_network(out)[1].mask_token_id == ref.config.mask_token_id
    (out / "tokenizer.json").unlink()
    (out / "tokenizer_config.json").unlink()
    with pytest.raises(UserError) as e:
        load_network(out)
    assert "mask_token_id" in one_line(e) and "config.json" in str(e.value)


def test_pretrained_load_of_an_ar_checkpoint(tmp_path):
    import unmask

    out, ref = write_tiny("qwen2", tmp_path / "m")
    model = unmask.load(out)
    tok = model.tokenizer
    assert tok.mask_id == model.config.mask_token_id not in (tok.eos_id, tok.pad_id)
    assert tok.end_id == tok.id_of("<|im_end|>") and tok.end_id in tok.stop_ids
    x = [[5, 17, 42, 8]]
    with torch.no_grad():
        want = ref(torch.tensor(x))
    got = model.logits(x)  # position i scores token i: the causal output is shifted back
    torch.testing.assert_close(got[0, 1:], want[0, :-1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
])
def test_rope_scaling_matches_transformers(scaling, tmp_path):
    """Llama 3.1's `llama3` scaling (and linear, YaRN) as transformers applies them, past the
    original context."""
    out, _ = write_tiny("llama", tmp_path / "llama", dtype=torch.float32)
    _edit_config(out, rope_scaling=scaling, rope_theta=10000.0)
    net, cfg, _, _ = load_network(out)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.type == scaling["rope_type"]
    x = torch.randint(0, cfg.vocab_size, (1, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = net(x)
    assert (ours - _transformers_logits(out, x)).abs().max().item() < TOL
