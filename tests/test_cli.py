"""The CLI: every user error is one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import unmask
from unmask.config import GenerationConfig, ModelConfig
from unmask.model import Transformer
from unmask.tokenizer import train_tokenizer

TEXT = "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n" * 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tok = train_tokenizer([TEXT], 300)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64, attention="block", objective="bd3lm",
                      block_size=4, vocab_size=tok.vocab_size, mask_token_id=tok.mask_id,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("m") / "tiny"
    unmask.save(Transformer(cfg), out, tokenizer=tok, generation=GenerationConfig(block_size=4, max_tokens=8))
    return out


def cli(*args, stdin=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "unmask.cli", *args], capture_output=True, text=True,
                          env=env, input=stdin, timeout=120)


def cli_here(*args):
    """`cli` in this process, for paths that fail or print help before any model work: the same
    return code and output, without a ~3 s interpreter and torch start per call."""
    import contextlib
    import io
    import types

    from unmask.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse: --help (0) and usage errors (2)
            rc = e.code
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_generate_json_contract(model_dir):
    r = cli("generate", "--model", str(model_dir), "--max-tokens", "8", "--json", "def f(")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"text", "completion_tokens", "nfe", "seconds"} <= out.keys()
    assert 1 <= out["nfe"] <= 8 and out["completion_tokens"] <= 8


def test_generate_prints_text_and_stats(model_dir):
    r = cli("generate", "--model", str(model_dir), "--max-tokens", "8", "--steps", "4", "def f(")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f(")
    assert "NFE" in r.stderr and "tok/s" in r.stderr and "tokens" in r.stderr


def test_missing_checkpoint(tmp_path):
    assert_user_error(cli("generate", "--model", str(tmp_path / "nope"), "x"), "not found")


def test_corrupt_checkpoint(tmp_path, model_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert_user_error(cli("generate", "--model", str(bad), "x"), "corrupt", "model.safetensors")


def test_config_that_does_not_match_weights(tmp_path, model_dir):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["d_model"], cfg["n_heads"] = 64, 2
    (bad / "config.json").write_text(json.dumps(cfg))
    assert_user_error(cli("generate", "--model", str(bad), "x"), "does not match the weights")


def test_prompt_longer_than_context(model_dir):
    assert_user_error(cli("generate", "--model", str(model_dir), "--max-tokens", "8", "x " * 200), "context")


def test_unknown_policy(model_dir):
    assert_user_error(cli("generate", "--model", str(model_dir), "--policy", "bogus", "x"), "unknown policy", "bogus")


def test_unknown_fallback(model_dir):
    assert_user_error(cli_here("generate", "--model", str(model_dir), "--fallback", "left", "x"),
                      "unknown fallback 'left'; choose one of: best, leftmost")
    assert_user_error(cli_here("generate", "--model", str(model_dir), "--reference", "--fallback", "leftmost", "x"),
                      "--fallback applies to the engine")


def test_malformed_manifest(tmp_path):
    m = tmp_path / "m.toml"
    m.write_text("[corpus\nstdlib = true\n")
    assert_user_error(cli("data", "build", "--manifest", str(m), "--out", str(tmp_path / "c")), str(m))


def test_missing_train_config(tmp_path):
    assert_user_error(cli("train", str(tmp_path / "none.toml"), "--out", str(tmp_path / "r")), "none.toml")


def test_every_subcommand_has_help():
    for args in (["--help"], ["generate", "--help"], ["train", "--help"], ["data", "build", "--help"],
                 ["tokenizer", "train", "--help"], ["eval", "bpb", "--help"], ["finetune", "--help"]):
        r = cli_here(*args)
        assert r.returncode == 0 and "usage:" in r.stdout, args


def test_quantized_reference_eval_is_refused(model_dir):
    assert_user_error(cli("eval", "lines", "--model", str(model_dir), "--reference", "--quantize", "int8wo"),
                      "--quantize applies to the engine")


def test_generate_without_lookahead_writes_the_same_tokens(model_dir):
    args = ("generate", "--model", str(model_dir), "--max-tokens", "24", "--steps", "24", "--json", "def add(")
    on, off = cli(*args), cli(*args[:-2], "--no-lookahead", *args[-2:])
    assert on.returncode == 0 == off.returncode, (on.stderr, off.stderr)
    a, b = json.loads(on.stdout), json.loads(off.stdout)
    assert a["text"] == b["text"] and b["nfe"] == a["completion_tokens"] == 24 >= a["nfe"]
    assert_user_error(cli_here("generate", "--model", str(model_dir), "--reference", "--no-lookahead", "x"),
                      "--no-lookahead applies to the engine")
    assert_user_error(cli_here("eval", "lines", "--model", str(model_dir), "--reference", "--no-lookahead"),
                      "--no-lookahead applies to the engine")
    assert_user_error(cli_here("generate", "--model", str(model_dir), "--quantize", "q8_0", "x"),
                      "quantize='q8_0' is a llama.cpp weight type")


def test_generate_with_int8_weights(model_dir):
    r = cli("generate", "--model", str(model_dir), "--quantize", "int8wo", "--json", "def add(")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nfe"] >= 1


def test_finetune_cli(model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "def add(a, b):", "completion": f"\n    return a + {i}"}) + "\n"
                            for i in range(6)))
    r = cli("finetune", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "ft"),
            "--epochs", "1", "--batch-size", "2", "--val-frac", "0.34", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["steps"] == 2 and s["held_out_examples"] == 2 and s["held_out_loss_after"] > 0
    assert cli("generate", "--model", str(tmp_path / "ft"), "--max-tokens", "4", "def").returncode == 0
    # a second run into the same directory, a broken line, a bad setting: one line each
    assert_user_error(cli("finetune", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "ft")),
                      "already exists")
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    assert_user_error(cli("finetune", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "x")),
                      f"{data}:2", "unrecognised keys")
    assert_user_error(cli("finetune", "--model", str(model_dir), "--data", str(data), "--out", str(tmp_path / "x"),
                          "--val-frac", "1.5"), "val_frac")
    assert not (tmp_path / "x").exists()
