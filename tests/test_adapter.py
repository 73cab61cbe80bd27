"""Adapter-only export (`unmask finetune --lora --save-adapter`) and loading an adapter onto a base:
the base plus the adapter is the merged export, in float32 and bfloat16; another base (other weights,
or another shape) is refused in one line, from Python and from the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import unmask
from test_finetune import FACTS, small, write_jsonl
from unmask.config import FinetuneConfig
from unmask.errors import UserError
from unmask.train.finetune import finetune


@pytest.fixture(scope="module")
def tuned(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapter")
    unmask.save(small(tok, "block"), d / "base", dtype=torch.float32)
    data = write_jsonl(d / "d.jsonl", [{"prompt": p, "completion": a} for p, a in FACTS])
    cfg = FinetuneConfig(epochs=30, batch_size=5, lr=1e-2, val_frac=0.0, lora=True, lora_rank=4)
    s = finetune(d / "base", data, d / "out", cfg, log=lambda *_: None, save_adapter=True)
    assert s["adapter"] == str(d / "out" / "adapter")
    return d


def test_base_plus_adapter_is_the_merged_export(tuned):
    d = tuned
    meta = json.loads((d / "out" / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == 4 and meta["base_model_name_or_path"] == str(d / "base")
    merged = unmask.load(d / "out")
    loaded = unmask.load(d / "base", adapter=d / "out" / "adapter")
    base = unmask.load(d / "base")
    x = torch.randint(5, 200, (2, 16))
    torch.testing.assert_close(loaded.net(x), merged.net(x), rtol=0, atol=1e-5)
    assert (loaded.net(x) - base.net(x)).abs().max() > 1e-2  # the adapter changed the model
    params = unmask.SamplingParams(max_tokens=4, temperature=0.0)
    prompts = [p for p, _ in FACTS]
    assert [o.text for o in unmask.Engine(loaded).generate(prompts, params)] == \
        [o.text for o in unmask.Engine(merged).generate(prompts, params)]
    # the base's fingerprint does not depend on the dtype it is loaded in
    half = unmask.load(d / "base", dtype=torch.bfloat16, adapter=d / "out" / "adapter")
    assert half.net.layers[0].attn.q_proj.weight.dtype == torch.bfloat16


def test_another_base_is_refused_in_one_line(tuned, tok, tmp_path):
    d = tuned
    unmask.save(small(tok, "block", seed=1), tmp_path / "other", dtype=torch.float32)  # same shape, other weights
    with pytest.raises(UserError, match=r"was trained on .*base, not on .*other \(base fingerprint") as e:
        unmask.load(tmp_path / "other", adapter=d / "out" / "adapter")
    assert "\n" not in str(e.value)
    unmask.save(small(tok, "block", d_model=48), tmp_path / "wide", dtype=torch.float32)
    with pytest.raises(UserError, match="was trained on"):
        unmask.load(tmp_path / "wide", adapter=d / "out" / "adapter")
    with pytest.raises(UserError, match="no adapter_config.json and adapter_model.safetensors there"):
        unmask.load(d / "base", adapter=tmp_path)


def test_cli(tuned, tmp_path):
    d = tuned
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "unmask", *args], capture_output=True, text=True, env=env,
                              timeout=120)

    outs = [cli("generate", "--model", str(d / m), *extra, "--max-tokens", "8", "--temperature", "0", "x = [1,")
            for m, extra in (("base", ["--adapter", str(d / "out" / "adapter")]), ("out", []), ("base", []))]
    assert all(r.returncode == 0 for r in outs), outs[0].stderr
    assert outs[0].stdout == outs[1].stdout != outs[2].stdout
    r = cli("generate", "--model", str(d / "out"), "--adapter", str(d / "out" / "adapter"), "x = ")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "was trained on" in r.stderr
    r = cli("finetune", "--data", str(d / "d.jsonl"), "--out", str(tmp_path / "o"), "--save-adapter")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "unmask: error: --save-adapter exports LoRA adapters; add --lora (an all-weights fine-tune has none)"]
