"""`unmask train` (pretraining) under torchrun with 2 gloo ranks: FSDP2 gives one process's losses and
weights with the same global batch (with gradient accumulation and activation checkpointing too), and
a run stopped by its time limit resumes on another world size, either way, to the uninterrupted
run's weights (checkpoints hold the full state)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from corpus_util import write_tiny_corpus
from test_train import losses, run_cli, write_config

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "unmask", *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def same_weights(a, b, atol=1e-5):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=atol, msg=k)


@pytest.mark.parametrize("micro,extra", [(4, ""), (2, "activation_checkpointing = true\n")])
def test_fsdp_two_ranks_match_one_process(tmp_path, corpus, micro, extra):
    # micro 2 with 2 ranks and batch 8: two accumulation steps per rank (gradient sync only on the last)
    cfg = write_config(tmp_path / "c.toml", corpus, "bd3lm", steps=4, micro=micro, extra=extra)
    one = run_cli("train", str(cfg), "--out", str(tmp_path / "one"), timeout=300)
    assert one.returncode == 0, one.stderr
    torchrun("train", str(cfg), "--out", str(tmp_path / "fsdp"), "--parallel", "fsdp")
    a, b = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert len(a) == len(b) == 4 and a == pytest.approx(b, rel=1e-5)
    log = [json.loads(x) for x in (tmp_path / "fsdp" / "log.jsonl").read_text().splitlines()]
    assert "eval_bpb" in log[-1] and log[-1]["grad_norm"] > 0  # evaluated with every rank taking part
    same_weights(tmp_path / "one" / "final", tmp_path / "fsdp" / "final")


def test_stopped_runs_resume_across_world_sizes(tmp_path, corpus):
    cfg = write_config(tmp_path / "c.toml", corpus, "mdlm", steps=4, micro=4)
    whole = run_cli("train", str(cfg), "--out", str(tmp_path / "whole"), timeout=300)
    assert whole.returncode == 0, whole.stderr
    # FSDP on 2 ranks stopped after step 1 (a checkpoint and a partial export), resumed by one process
    torchrun("train", str(cfg), "--out", str(tmp_path / "a"), "--parallel", "fsdp", "--time-limit", "0")
    assert (tmp_path / "a" / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert (tmp_path / "a" / "partial" / "model.safetensors").exists()
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "a"), "--resume", timeout=300)
    assert r.returncode == 0, r.stderr
    same_weights(tmp_path / "whole" / "final", tmp_path / "a" / "final")
    # one process stopped, resumed by FSDP on 2 ranks
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "b"), "--time-limit", "0", timeout=300)
    assert r.returncode == 0, r.stderr
    torchrun("train", str(cfg), "--out", str(tmp_path / "b"), "--parallel", "fsdp", "--resume")
    same_weights(tmp_path / "whole" / "final", tmp_path / "b" / "final")
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)


def test_fsdp_with_ema_is_one_line(tmp_path, corpus):
    cfg = write_config(tmp_path / "c.toml", corpus, "bd3lm", steps=2, extra="ema = 0.9\n")
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "x"), "--parallel", "fsdp", timeout=120)
    assert r.returncode == 2 and "train.ema does not combine with FSDP" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
