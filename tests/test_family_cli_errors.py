"""Bad foreign checkpoints through the CLI: one line on stderr, exit code 2, never a traceback.
(The loader's messages themselves are checked in test_families.py / test_gguf.py.)"""
from __future__ import annotations

import json
import shutil

import pytest

from unmask.cli import main
from unmask.families.tiny import write_tiny


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return write_tiny("llada", tmp_path_factory.mktemp("cli-errors") / "llada")[0]


def _break(kind: str, d):
    cfg = json.loads((d / "config.json").read_text())
    shard = sorted(d.glob("model-*.safetensors"))[0]
    if kind == "missing shard":
        shard.unlink()
    elif kind == "truncated shard":
        shard.write_bytes(shard.read_bytes()[:200])
    elif kind == "shape mismatch":
        cfg["mlp_hidden_size"] += 8
    elif kind == "unknown model_type":
        cfg["model_type"] = "gpt_neox"
    elif kind == "remote code only":
        cfg.pop("model_type")
        cfg["auto_map"] = {"AutoModel": "modeling_llada.LLaDAModelLM"}
    elif kind == "special ids disagree":
        cfg["mask_token_id"] = cfg["eos_token_id"] + 1
    (d / "config.json").write_text(json.dumps(cfg))


CASES = {
    "missing shard": "missing",
    "truncated shard": "corrupt",
    "shape mismatch": "config.json implies",
    "unknown model_type": "supported",
    "remote code only": "its own code",
    "special ids disagree": "mask",
}


@pytest.mark.parametrize("kind", CASES)
def test_one_line_and_exit_2(kind, llada, tmp_path, capsys):
    d = tmp_path / "m"
    shutil.copytree(llada, d)
    _break(kind, d)
    assert main(["generate", "--model", str(d), "--max-tokens", "4", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and CASES[kind] in err[0], err


def test_not_enough_memory_gives_both_numbers(llada, monkeypatch, capsys):
    monkeypatch.setattr("unmask.families.load.available_memory", lambda device: 1000)
    assert main(["generate", "--model", str(llada), "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB" in err[0] and "available" in err[0], err
