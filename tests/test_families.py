"""Checkpoint families (src/unmask/families/): parity with each family's own modeling code on the shared
fixtures, round trips through tiny checkpoints in each family's layout, and the loader's errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from unmask.config import GenerationConfig
from unmask.errors import UserError
from unmask.families import get, load_network, supported
from unmask.families.spec import token_id
from unmask.families.tiny import tiny_families, write_tiny
from unmask.model import block_causal_mask
from unmask.model.logit_shift import align_logits

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "families"
# fixture dir -> (model_type, mask id, end-of-turn id), from each fixture's README
FIXTURE_FACTS = {
    "llada-tiny": ("llada", 1026, 1029),
    "dream-tiny": ("Dream", 1028, 1026),
    "sdar-tiny": ("sdar", 1050, 1026),
    "llada2-moe-tiny": ("llada2_moe", 1027, 1030),
    "fastdllm-v2-tiny": ("Fast_dLLM_Qwen", 1046, 1026),
}
FP32_TOL, BF16_TOL = 1e-4, 3e-2


def fixture(name: str) -> Path:
    d = FIXTURES / name
    if not (d / "reference_logits.safetensors").exists():
        pytest.skip(f"fixture {d} is not available")
    return d


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- parity with the families' own code --------------------------------------------------------
@pytest.mark.parametrize("name", list(FIXTURE_FACTS))
def test_fixture_logits_match_fp32(name):
    d = fixture(name)
    ref = load_file(d / "reference_logits.safetensors")
    net, cfg, spec, raw = load_network(d)
    model_type, mask_id, eot_id = FIXTURE_FACTS[name]
    assert raw["model_type"] == model_type and cfg.family == model_type and model_type in spec.model_types
    assert cfg.mask_token_id == mask_id
    assert token_id(d, spec.end_of_turn) == eot_id
    ids = ref["input_ids"]
    if "attention_mask" in ref:  # the reference's mask is our default one: block-causal from position 0
        pos = torch.arange(ids.shape[1])
        assert cfg.attention == "block"
        assert torch.equal(block_causal_mask(pos, pos, cfg.block_size), ref["attention_mask"].bool())
    else:
        assert cfg.attention == "full"
    with torch.no_grad():
        out = net(ids)
    diff = (out - ref["logits"]).abs().max().item()
    print(f"{name}: fp32 max |diff| {diff:.2e}")
    assert diff < FP32_TOL
    if "logits_shifted" in ref:  # what Dream's / Fast-dLLM v2's samplers read
        assert cfg.logit_shift == 1
        torch.testing.assert_close(align_logits(out, cfg.logit_shift), ref["logits_shifted"], atol=FP32_TOL, rtol=0)
    else:
        assert cfg.logit_shift == 0


@pytest.mark.parametrize("name", list(FIXTURE_FACTS))
def test_fixture_logits_match_bf16(name):
    d = fixture(name)
    ref = load_file(d / "reference_logits.safetensors")
    net, cfg, _, _ = load_network(d, dtype=torch.bfloat16)
    assert net.embed.weight.dtype == torch.bfloat16
    with torch.no_grad():
        per_position = (net(ref["input_ids"]) - ref["logits"]).abs().amax(-1).flatten()
    print(f"{name}: bf16 max |diff| {per_position.max().item():.2e}")
    if cfg.moe is None:
        assert per_position.max() < BF16_TOL
    else:  # bf16 activations flip the expert choice of a few tokens; every other position must agree
        assert (per_position < BF16_TOL).float().mean() > 0.95


@pytest.mark.parametrize("name", list(FIXTURE_FACTS))
def test_fixture_family_metadata(name):
    d = fixture(name)
    _, cfg, spec, _ = load_network(d)
    assert spec.chat_template(d)  # found where the family keeps it
    gen = spec.generation_config()
    assert isinstance(gen, GenerationConfig) and gen.block_size >= 1
    if cfg.attention == "block":
        assert gen.block_size == cfg.block_size


# ---- round trips through tiny checkpoints ------------------------------------------------------
@pytest.mark.parametrize("model_type", tiny_families())
def test_tiny_round_trip(model_type, tmp_path):
    out, ref = write_tiny(model_type, tmp_path / model_type)
    net, cfg, spec, raw = load_network(out)
    assert cfg == ref.config and raw["model_type"] == model_type
    x = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        assert torch.equal(net(x), ref(x))
    # the files hold exactly the family's names, as state_to_hf writes them
    stored = {k for f in out.glob("*.safetensors") for k in load_file(f)}
    assert stored == set(spec.state_to_hf(ref.state_dict(), cfg))
    if model_type == "llada2_moe":
        assert any("query_key_value" in k for k in stored) and not any("q_proj" in k for k in stored)
    if model_type == "llada":
        assert (out / "model.safetensors.index.json").exists()  # sharded, as the real directories are
        assert "model.transformer.ff_out.weight" in stored and "model.transformer.blocks.0.ff_out.weight" in stored


def test_tiny_bf16_load_keeps_expert_bias_fp32(tmp_path):
    out, ref = write_tiny("llada2_moe", tmp_path / "m")
    net, *_ = load_network(out, dtype=torch.bfloat16)
    assert net.layers[1].mlp.router.expert_bias.dtype == torch.float32
    assert net.layers[0].attn.q_proj.weight.dtype == torch.bfloat16
    assert not any(t.is_meta for t in [*net.parameters(), *net.buffers()])


def test_our_own_checkpoints_load_through_the_unmask_family(tok, tmp_path):
    from conftest import random_pretrained
    from unmask.pretrained import save
    model = random_pretrained(tok, "block")
    save(model, tmp_path / "ours", dtype=torch.float32)
    net, cfg, spec, _ = load_network(tmp_path / "ours")
    assert spec.name == "unmask" and cfg == model.config
    assert net.lm_head.weight is net.embed.weight
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(net(x), model.net(x))


# ---- registry and errors -----------------------------------------------------------------------
def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_registry_lists_every_family():
    assert set(supported()) >= {"unmask", "llada", "Dream", "sdar", "llada2_moe", "Fast_dLLM_Qwen"}
    with pytest.raises(UserError) as e:
        get("gpt2")
    assert "gpt2" in one_line(e) and "llada2_moe" in str(e.value) and "Dream" in str(e.value)


def _edit_config(d: Path, **changes) -> None:
    raw = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    (d / "config.json").write_text(json.dumps(raw))


def test_unknown_model_type_lists_supported(tmp_path):
    out, _ = write_tiny("Dream", tmp_path / "m")
    _edit_config(out, model_type="qwen2_vl")
    with pytest.raises(UserError) as e:
        load_network(out)
    msg = one_line(e)
    assert "config.json" in msg and "qwen2_vl" in msg and "llada" in msg and "sdar" in msg


def test_auto_map_only_config_is_refused(tmp_path):
    out, _ = write_tiny("sdar", tmp_path / "m")
    _edit_config(out, model_type=None)
    with pytest.raises(UserError) as e:
        load_network(out)
    msg = one_line(e)
    assert "auto_map" in msg and "own code" in msg and "sdar" in msg


def test_shape_mismatch_names_file_tensor_and_both_shapes(tmp_path):
    out, _ = write_tiny("Dream", tmp_path / "m")
    _edit_config(out, intermediate_size=100)
    with pytest.raises(UserError) as e:
        load_network(out)
    msg = one_line(e)
    assert "model.safetensors" in msg and "model.layers.0.mlp.gate_proj.weight" in msg
    assert "(96, 64)" in msg and "(100, 64)" in msg


def test_fused_qkv_shape_mismatch(tmp_path):
    out, _ = write_tiny("llada2_moe", tmp_path / "m")
    _edit_config(out, num_key_value_heads=4)
    with pytest.raises(UserError) as e:
        load_network(out)
    msg = one_line(e)
    assert "query_key_value.weight" in msg and "(128, 64)" in msg and "(192, 64)" in msg


def test_missing_shard(tmp_path):
    out, _ = write_tiny("llada", tmp_path / "m")
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError) as e:
        load_network(out)
    assert "model-00002-of-00002.safetensors" in one_line(e) and "missing" in str(e.value)


def test_truncated_shard(tmp_path):
    out, _ = write_tiny("sdar", tmp_path / "m")
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(UserError) as e:
        load_network(out)
    assert "model.safetensors" in one_line(e) and "corrupt" in str(e.value)


def test_missing_and_unexpected_tensors(tmp_path):
    out, _ = write_tiny("Fast_dLLM_Qwen", tmp_path / "m")
    f = out / "model.safetensors"
    state = load_file(f)
    save_file({k: v for k, v in state.items() if k != "model.norm.weight"}, f)
    with pytest.raises(UserError) as e:
        load_network(out)
    assert "model.norm.weight" in one_line(e) and "missing" in str(e.value)
    save_file({**state, "model.layers.0.self_attn.rotary_emb.scale": torch.ones(1)}, f)
    with pytest.raises(UserError) as e:
        load_network(out)
    assert "unexpected tensor model.layers.0.self_attn.rotary_emb.scale" in one_line(e)
    save_file({**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, f)
    load_network(out)  # a stored RoPE buffer is fine: we compute our own


def test_not_enough_memory(tmp_path, monkeypatch):
    import unmask.families.load as loader
    out, _ = write_tiny("llada", tmp_path / "m")
    monkeypatch.setattr(loader, "available_memory", lambda device: 1000)
    with pytest.raises(UserError) as e:
        load_network(out)
    msg = one_line(e)
    assert "GiB" in msg and "0.00 GiB is available" in msg and "needs about" in msg


def test_unsupported_options_are_refused(tmp_path):
    out, _ = write_tiny("llada", tmp_path / "m")
    _edit_config(out, alibi=True)
    with pytest.raises(UserError) as e:
        load_network(out)
    assert "alibi" in one_line(e)
    out, _ = write_tiny("Dream", tmp_path / "d")
    _edit_config(out, rope_scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(UserError) as e:
        load_network(out)
    assert "longrope" in one_line(e)


def test_rope_scaling_is_read_from_config(tmp_path):
    out, _ = write_tiny("sdar", tmp_path / "m")
    _edit_config(out, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    net, cfg, _, _ = load_network(out)
    assert cfg.rope_scaling.type == "yarn" and cfg.rope_scaling.factor == 4.0
    assert net.rope_cos[0, 0].item() == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)


def test_mask_id_falls_back_to_the_tokenizer_then_the_native_id(tmp_path):
    out, ref = write_tiny("Fast_dLLM_Qwen", tmp_path / "m")  # its config has no mask_token_id
    assert "mask_token_id" not in json.loads((out / "config.json").read_text())
    _, cfg, _, _ = load_network(out)
    assert cfg.mask_token_id == ref.config.mask_token_id == token_id(out, "|<MASK>|")
    (out / "tokenizer.json").unlink()
    with pytest.raises(UserError) as e:  # the native id 151665 does not fit the tiny vocabulary
        load_network(out)
    assert "mask_token_id=151665" in one_line(e)
