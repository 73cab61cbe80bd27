"""Checkpoint IO: save/load round trips, sharding, clear errors and crash safety."""
from __future__ import annotations

import json
import os

import pytest
import torch

import unmask.pretrained as pretrained
from conftest import tiny_config
from unmask.config import GenerationConfig
from unmask.errors import UserError
from unmask.model import Transformer
from unmask.pretrained import INDEX, Pretrained, load, save

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 272  # >= the tokenizer's 266 (10 specials + 256 bytes)


@pytest.fixture(scope="module")
def tokenizer():
    from unmask.tokenizer import MIN_VOCAB, train_tokenizer

    return train_tokenizer(["def f(x):\n    return x + 1\n", "hello world", "print('hi')"] * 3,
                           vocab_size=MIN_VOCAB)


def make_net(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_config(vocab_size=VOCAB, **kw))


def bf16_rounded(net: Transformer) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.bfloat16).float() for k, v in net.state_dict().items()}


def assert_weights(loaded: Transformer, expected: dict[str, torch.Tensor]):
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v), k


def hidden_entries(parent):
    return sorted(n for n in os.listdir(parent) if n.startswith("."))


@pytest.fixture
def saved(tmp_path, tokenizer):
    net = make_net()
    out = save(net, tmp_path / "ckpt", tokenizer=tokenizer)
    return net, out


# ---- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("tie,shift", [(True, False), (False, False), (True, True)])
def test_round_trip(tmp_path, tokenizer, tie, shift):
    net = make_net(tie_embeddings=tie, n_kv_heads=2, token_shift=shift)
    gen = GenerationConfig(policy="threshold", threshold=0.75, steps=12, block_size=8, max_tokens=40,
                           temperature=0.5, top_p=0.9)
    out = save(net, tmp_path / "ckpt", tokenizer=tokenizer, generation=gen, card="# tiny\n")
    assert out == tmp_path / "ckpt"
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json",
                                       "model.safetensors", "tokenizer.json"]
    assert os.listdir(tmp_path) == ["ckpt"]  # no temp dirs left behind

    m = load(out)
    assert isinstance(m, Pretrained)
    assert m.config == net.config
    assert m.generation == gen
    assert m.path == out
    assert m.tokenizer.to_str() == tokenizer.to_str()
    assert_weights(m.net, bf16_rounded(net))
    if tie:
        assert m.net.lm_head.weight is m.net.embed.weight
    else:
        assert m.net.lm_head.weight.data_ptr() != m.net.embed.weight.data_ptr()
    # the loaded network computes what the original (with bf16-rounded weights) computes:
    # this also covers the RoPE tables, which are not stored
    ref = make_net(tie_embeddings=tie, n_kv_heads=2, token_shift=shift)
    ref.load_state_dict(bf16_rounded(net))
    x = torch.randint(0, VOCAB, (2, 9))
    x[:, 3:5] = net.config.mask_token_id
    with torch.no_grad():
        torch.testing.assert_close(m.net(x), ref.eval()(x), atol=1e-5, rtol=1e-5)
    assert not m.net.training


def test_load_in_bf16(saved):
    net, out = saved
    m = load(out, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.net.parameters())
    assert m.device == torch.device("cpu")
    for k, v in net.state_dict().items():
        assert torch.equal(m.net.state_dict()[k], v.to(torch.bfloat16)), k


def test_default_generation_config_follows_block_size(tmp_path, tokenizer):
    net = make_net(block_size=8)
    out = save(net, tmp_path / "ckpt", tokenizer=tokenizer)
    (out / "generation_config.json").unlink()
    m = load(out)
    assert m.generation.block_size == 8


def test_resave_pretrained(tmp_path, saved):
    net, out = saved
    m = load(out)
    out2 = save(m, tmp_path / "again")
    m2 = load(out2)
    assert m2.config == m.config and m2.tokenizer.to_str() == m.tokenizer.to_str()
    assert_weights(m2.net, bf16_rounded(net))


def test_sharding(tmp_path, tokenizer, monkeypatch):
    net = make_net()
    monkeypatch.setattr(pretrained, "MAX_SHARD_BYTES", 16 * 1024)
    out = save(net, tmp_path / "ckpt", tokenizer=tokenizer)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2
    assert "model.safetensors" not in files and INDEX in files
    assert all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    index = json.loads((out / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    expected = {k for k in net.state_dict() if k != "lm_head.weight"}
    assert set(index["weight_map"]) == expected
    total = sum(v.numel() * 2 for k, v in net.state_dict().items() if k in expected)
    assert index["metadata"]["total_size"] == total
    assert hidden_entries(tmp_path) == []
    m = load(out)
    assert_weights(m.net, bf16_rounded(net))
    assert m.net.lm_head.weight is m.net.embed.weight

    # re-saving unsharded over it leaves no stale shards behind
    monkeypatch.setattr(pretrained, "MAX_SHARD_BYTES", 15 * 2**20)
    net2 = make_net(seed=1)
    save(net2, out, tokenizer=tokenizer)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json"]
    assert_weights(load(out).net, bf16_rounded(net2))
    assert hidden_entries(tmp_path) == []


def test_save_over_existing_keeps_model_card(tmp_path, tokenizer):
    out = save(make_net(), tmp_path / "ckpt", tokenizer=tokenizer, card="hand-written\n")
    save(make_net(seed=1), out, tokenizer=tokenizer)
    assert (out / "README.md").read_text() == "hand-written\n"
    assert hidden_entries(tmp_path) == []


# ---- load errors ------------------------------------------------------------------------------

def load_error(path) -> str:
    with pytest.raises(UserError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    return msg


def test_missing_dir(tmp_path):
    assert "not found" in load_error(tmp_path / "nope")


def test_missing_config(saved):
    _, out = saved
    (out / "config.json").unlink()
    assert "config.json" in load_error(out)


def test_missing_weights(saved):
    _, out = saved
    (out / "model.safetensors").unlink()
    assert "model.safetensors" in load_error(out)


def test_corrupt_config_json(saved):
    _, out = saved
    (out / "config.json").write_text('{"d_model": 32,')
    assert "config.json" in load_error(out)


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_safetensors(saved, keep):
    _, out = saved
    f = out / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    msg = load_error(out)
    assert "model.safetensors" in msg and "corrupt" in msg


def test_truncated_shard(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(pretrained, "MAX_SHARD_BYTES", 16 * 1024)
    out = save(make_net(), tmp_path / "ckpt", tokenizer=tokenizer)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    msg = load_error(out)
    assert shard.name in msg and "corrupt" in msg
    shard.unlink()
    assert "missing" in load_error(out)


def test_corrupt_index(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(pretrained, "MAX_SHARD_BYTES", 16 * 1024)
    out = save(make_net(), tmp_path / "ckpt", tokenizer=tokenizer)
    (out / INDEX).write_text("{")
    assert INDEX in load_error(out)


def test_config_does_not_match_weights(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["d_model"] = 64
    (out / "config.json").write_text(json.dumps(cfg))
    assert "does not match" in load_error(out)


def test_config_with_fewer_layers_than_weights(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["n_layers"] = 1
    (out / "config.json").write_text(json.dumps(cfg))
    assert "does not match" in load_error(out)


@pytest.mark.parametrize("model_type", ["llama", None])
def test_wrong_model_type(saved, model_type):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    if model_type is None:
        del cfg["model_type"]
    else:
        cfg["model_type"] = model_type
    (out / "config.json").write_text(json.dumps(cfg))
    assert "model_type" in load_error(out)


def test_invalid_config_field(saved):
    _, out = saved
    cfg = json.loads((out / "config.json").read_text())
    cfg["n_heads"] = 5  # 32 is not divisible by 5
    (out / "config.json").write_text(json.dumps(cfg))
    assert "n_heads" in load_error(out)


def test_missing_tokenizer(saved):
    _, out = saved
    (out / "tokenizer.json").unlink()
    assert "tokenizer" in load_error(out)


# ---- crash safety -----------------------------------------------------------------------------

def _assert_previous_intact(tmp_path, out, net):
    assert sorted(os.listdir(tmp_path)) == ["ckpt"], os.listdir(tmp_path)  # no half-written dir
    assert_weights(load(out).net, bf16_rounded(net))


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_shard_writer_keeps_previous(saved, tmp_path, tokenizer, monkeypatch, exc):
    net, out = saved

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(pretrained, "_write_shards", boom)
    with pytest.raises(type(exc)):
        save(make_net(seed=1), out, tokenizer=tokenizer)
    _assert_previous_intact(tmp_path, out, net)


def test_interrupted_after_first_shard_keeps_previous(saved, tmp_path, tokenizer, monkeypatch):
    net, out = saved
    real = pretrained.save_file
    calls = []

    def second_fails(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(pretrained, "MAX_SHARD_BYTES", 16 * 1024)
    monkeypatch.setattr(pretrained, "save_file", second_fails)
    with pytest.raises(OSError, match="disk full"):
        save(make_net(seed=1), out, tokenizer=tokenizer)
    assert len(calls) == 2
    _assert_previous_intact(tmp_path, out, net)


def test_interrupted_first_save_leaves_nothing(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(pretrained, "_write_shards", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        save(make_net(), tmp_path / "ckpt", tokenizer=tokenizer)
    assert os.listdir(tmp_path) == []


def test_interrupted_during_swap_restores_previous(saved, tmp_path, tokenizer, monkeypatch):
    """The window between moving the old checkpoint aside and moving the new one in."""
    net, out = saved
    real = os.replace

    def fail_on_install(src, dst):
        if os.fspath(dst) == os.fspath(out) and os.path.basename(os.fspath(src)).startswith(".ckpt.") \
                and not os.fspath(src).endswith(".old"):
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(pretrained.os, "replace", fail_on_install)
    with pytest.raises(KeyboardInterrupt):
        save(make_net(seed=1), out, tokenizer=tokenizer)
    monkeypatch.undo()
    _assert_previous_intact(tmp_path, out, net)
