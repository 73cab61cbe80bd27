"""`unmask finetune` under torchrun with 2 gloo ranks on the CPU: DDP and FSDP2 give the losses and
weights of one process with the same global batch (all weights and LoRA), and a run stopped by its
time limit resumes exactly, on the same world size and on another (checkpoints hold the full state)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import unmask
from test_finetune import FACTS, small, write_jsonl

pytestmark = pytest.mark.timeout(600)
ARGS = ["--val-frac", "0", "--epochs", "6", "--batch-size", "4", "--lr", "3e-3", "--noise-samples", "2", "--threads", "1",
        "--json"]  # 2 rotated noise copies: their layout over the global batch must survive sharding too


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    unmask.save(small(tok, "block"), d / "base", dtype=torch.float32)
    write_jsonl(d / "d.jsonl", [{"prompt": p, "completion": a} for p, a in FACTS])
    return d


def finetune(d, out, *extra, ranks=1):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                "-m", "unmask"] if ranks > 1 else [sys.executable, "-m", "unmask"]
    r = subprocess.run([*launcher, "finetune", "--model", str(d / "base"), "--data", str(d / "d.jsonl"), "--out",
                        str(d / out), *ARGS, *extra], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


def history(d, out):
    return [h["loss"] for h in json.loads((d / out / "finetune.json").read_text())["history"]]


def assert_same_weights(d, a, b, atol=1e-5):
    wa, wb = load_file(d / a / "model.safetensors"), load_file(d / b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("lora", [False, True])
def test_ddp_and_fsdp_equal_one_process(setup, lora):
    d, extra = setup, ["--lora", "--save-adapter"] if lora else []
    one = f"one{int(lora)}"
    finetune(d, one, *extra)
    for mode in ("ddp", "fsdp"):
        out = f"{mode}{int(lora)}"
        printed = finetune(d, out, *extra, "--parallel", mode, ranks=2)
        assert len(printed) == 1  # rank 0 reports for both
        assert history(d, out) == pytest.approx(history(d, one), rel=1e-5, abs=1e-6)
        assert_same_weights(d, one, out)
        if lora:  # the adapters alone, gathered from the shards like the merged weights
            a, b = (load_file(d / x / "adapter" / "adapter_model.safetensors") for x in (one, out))
            assert a.keys() == b.keys() and len(a) == 2 * 7 * 2  # A and B of 7 layers in 2 blocks
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_stopped_runs_resume_on_the_same_and_another_world_size(setup):
    d = setup
    finetune(d, "whole")
    # FSDP on 2 ranks, stopped after its first step, resumed on 2 ranks
    stop = finetune(d, "fsdp_cut", "--parallel", "fsdp", "--time-limit", "0", ranks=2)
    assert stop == [{"stopped_at": 1, "steps": 15, "rank": 0}]
    assert (d / "fsdp_cut" / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    finetune(d, "fsdp_cut", "--parallel", "fsdp", "--resume", ranks=2)
    assert_same_weights(d, "whole", "fsdp_cut")
    assert history(d, "fsdp_cut") == pytest.approx(history(d, "whole"), rel=1e-5, abs=1e-6)
    # DDP on 2 ranks, stopped, resumed by one process (and the other way round)
    finetune(d, "ddp_cut", "--parallel", "ddp", "--time-limit", "0", ranks=2)
    finetune(d, "ddp_cut", "--resume")
    assert_same_weights(d, "whole", "ddp_cut")
    finetune(d, "one_cut", "--time-limit", "0")
    finetune(d, "one_cut", "--parallel", "fsdp", "--resume", ranks=2)
    assert_same_weights(d, "whole", "one_cut")
