"""Trainer: DDP equals one process, SIGKILL + resume is bit-identical, checkpoints are atomic."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from corpus_util import write_tiny_corpus
from unmask.errors import UserError
from unmask.tokenizer import Tokenizer

CONFIG = """
[model]
d_model = 32
n_layers = 2
n_heads = 2
max_seq_len = 64
attention = "{attention}"
objective = "{objective}"
block_size = 4

[data]
dir = "{corpus}"
seq_len = 32

[optim]
lr = 3e-3
warmup_steps = 3

[train]
max_steps = {steps}
batch_size = 8
micro_batch_size = {micro}
eval_interval = {eval_interval}
eval_batches = 2
ckpt_interval = {ckpt}
log_interval = 1
seed = 3
threads = 1
{extra}"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


def write_config(path: Path, corpus: Path, objective="bd3lm", steps=6, micro=4, ckpt=100, eval_interval=3,
                 extra=""):
    """extra: more `key = value` lines for the [train] table."""
    attention = {"bd3lm": "block", "mdlm": "full", "ar": "causal"}[objective]
    path.write_text(CONFIG.format(attention=attention, objective=objective, corpus=corpus, steps=steps,
                                  micro=micro, ckpt=ckpt, eval_interval=eval_interval, extra=extra))
    return path


def run_cli(*args, env_extra=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "unmask.cli", *args], capture_output=True, text=True, env=env, **kw)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("objective", ["bd3lm", "mdlm", "ar"])
def test_training_lowers_heldout_bpb_and_exports_a_loadable_model(tmp_path, corpus, objective):
    import unmask
    from unmask.data import corpus_meta, load_split
    from unmask.eval import bits_per_byte
    from unmask.model import Transformer

    cfg = write_config(tmp_path / "c.toml", corpus, objective, steps=80, eval_interval=40)
    from unmask.train import train
    final = train(cfg, tmp_path / "run")
    assert len(losses(tmp_path / "run")) == 80
    evals = [r for r in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "eval_bpb" in r]
    assert [r["step"] for r in evals] == [40, 80]
    model = unmask.load(final)
    assert model.config.objective == objective
    assert (final / "tokenizer.json").exists() and (final / "generation_config.json").exists()
    val, split = load_split(corpus, "val"), corpus_meta(corpus)["splits"]["val"]
    bpt = split["bytes"] / split["tokens"]
    kw = dict(seq_len=32, batch=4, n_batches=2, seed=3)
    trained = bits_per_byte(model.net, val, bpt, **kw)["bpb"]
    untrained = bits_per_byte(Transformer(model.config), val, bpt, **kw)["bpb"]
    assert trained == pytest.approx(evals[-1]["eval_bpb"], rel=1e-4)  # the log reports what the model scores
    assert trained < 0.92 * untrained, (trained, untrained)


@pytest.mark.slow
def test_ddp_two_gloo_ranks_match_one_process(tmp_path, corpus):
    cfg = write_config(tmp_path / "c.toml", corpus, "bd3lm", steps=4, micro=4)
    single = run_cli("train", str(cfg), "--out", str(tmp_path / "single"), timeout=300)
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          "-m", "unmask.cli", "train", str(cfg), "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)
    wa = load_file(tmp_path / "single" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path, corpus):
    # With an EMA and bf16 autocast, so that their state and numerics are part of what must resume exactly.
    steps = 60
    cfg = write_config(tmp_path / "c.toml", corpus, "bd3lm", steps=steps, micro=8, ckpt=5, eval_interval=20,
                       extra='ema = 0.9\nprecision = "bf16"\n')
    ref = run_cli("train", str(cfg), "--out", str(tmp_path / "ref"), timeout=300)
    assert ref.returncode == 0, ref.stderr

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "unmask.cli", "train", str(cfg), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_00000010"):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text().strip()
    assert not (out / "final").exists(), "the run finished before it was killed; the test proves nothing"
    assert killed_at < f"step_{steps:08d}"

    resumed = run_cli("train", str(cfg), "--out", str(out), "--resume", timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    wa = load_file(tmp_path / "ref" / "final" / "model.safetensors")
    wb = load_file(out / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert losses(tmp_path / "ref") == losses(out)
    ea = load_file(tmp_path / "ref" / "checkpoints" / f"step_{steps:08d}" / "ema.safetensors")
    eb = load_file(out / "checkpoints" / f"step_{steps:08d}" / "ema.safetensors")
    assert ea.keys() == eb.keys() and all(torch.equal(ea[k], eb[k]) for k in ea)
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert "eval_bpb_ema" in log[-1] and log[-1]["achieved_tflops"] > 0


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from unmask.train import checkpoint as ck

    net = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    root = tmp_path / "ckpt"
    ck.save_checkpoint(root, 5, net, opt, {})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError):
        ck.save_checkpoint(root, 10, net, opt, {})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000005"]
    assert ck.latest_checkpoint(root).name == "step_00000005"


def test_existing_run_without_resume_and_bad_config_are_user_errors(tmp_path, corpus):
    cfg = write_config(tmp_path / "c.toml", corpus, "ar", steps=2, ckpt=1)
    assert run_cli("train", str(cfg), "--out", str(tmp_path / "run"), timeout=120).returncode == 0
    again = run_cli("train", str(cfg), "--out", str(tmp_path / "run"), timeout=120)
    assert again.returncode == 2 and "--resume" in again.stderr and "Traceback" not in again.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("d_model = 32", "d_modle = 32"))
    r = run_cli("train", str(bad), "--out", str(tmp_path / "x"), timeout=120)
    assert r.returncode == 2 and "d_modle" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_mismatched_objective_and_attention_is_rejected(tmp_path, corpus):
    from unmask.config import load_train_config

    cfg = write_config(tmp_path / "c.toml", corpus, "ar")
    cfg.write_text(cfg.read_text().replace('attention = "causal"', 'attention = "full"'))
    with pytest.raises(UserError, match="objective 'ar' needs attention 'causal'"):
        load_train_config(cfg)


def test_fim_rate_reaches_the_batches(tmp_path, corpus, monkeypatch):
    """data.fim_rate is passed through to the batch builder with the tokenizer's FIM ids."""
    from unmask.train import trainer

    seen = []
    real = trainer.global_batch

    def spy(*args):
        seen.append(args[9:])
        return real(*args)

    monkeypatch.setattr(trainer, "global_batch", spy)
    cfg = write_config(tmp_path / "c.toml", corpus, "ar", steps=2)
    cfg.write_text(cfg.read_text().replace("seq_len = 32", "seq_len = 32\nfim_rate = 0.5"))
    trainer.train(cfg, tmp_path / "run")
    assert seen and all(s[0] == 0.5 and (s[1].prefix_id, s[1].suffix_id, s[1].middle_id) == (3, 4, 5)
                        and s[1].end_id is None and s[1].line_starts is None for s in seen)
    seen.clear()
    cfg.write_text(cfg.read_text().replace("fim_rate = 0.5", "fim_rate = 0.5\nfim_end = true\nfim_line_rate = 0.5\n"
                                                             'fim_layout = "spm"'))
    final = trainer.train(cfg, tmp_path / "run2")
    tok = Tokenizer.from_file(corpus / "tokenizer.json")
    spec = seen[0][1]
    assert spec.end_id == tok.eos_id and spec.line_rate == 0.5 and spec.layout == "spm"
    # the export tells the samplers which layout to prompt the model with
    assert json.loads((final / "generation_config.json").read_text())["fim_layout"] == "spm"
    assert [i for i in range(tok.vocab_size) if spec.line_starts[i]] == \
        [i for i in range(tok.vocab_size) if tok.decode([i], skip_special=True).startswith("\n")] != []


def test_init_from_starts_a_fine_tune_from_saved_weights(tmp_path, corpus):
    from unmask.train import trainer

    base = trainer.train(write_config(tmp_path / "a.toml", corpus, "ar", steps=2), tmp_path / "a")
    # lr 0: the fine-tune cannot move, so its export must be the weights it started from
    cfg = write_config(tmp_path / "b.toml", corpus, "ar", steps=2, extra=f'init_from = "{base}"')
    cfg.write_text(cfg.read_text().replace("lr = 3e-3", "lr = 0.0\nmin_lr = 0.0"))
    tuned = trainer.train(cfg, tmp_path / "b")
    wa, wb = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the same run without init_from keeps its random start, which the base run had moved away from
    plain = write_config(tmp_path / "c.toml", corpus, "ar", steps=2)
    plain.write_text(cfg.read_text().replace(f'init_from = "{base}"', ""))
    scratch = load_file(trainer.train(plain, tmp_path / "c") / "model.safetensors")
    assert not torch.equal(scratch["embed.weight"], wa["embed.weight"])


def test_init_from_rejects_a_different_architecture(tmp_path, corpus):
    from unmask.train import trainer

    base = trainer.train(write_config(tmp_path / "a.toml", corpus, "ar", steps=1), tmp_path / "a")
    cfg = write_config(tmp_path / "b.toml", corpus, "ar", steps=1, extra=f'init_from = "{base}"')
    cfg.write_text(cfg.read_text().replace("d_model = 32", "d_model = 64"))
    with pytest.raises(UserError, match=r"init_from=.* has d_model=32 but \[model\] gives 64"):
        trainer.train(cfg, tmp_path / "b")


def test_wsd_schedule_is_flat_until_its_decay_so_raising_max_steps_keeps_every_step_taken():
    from unmask.config import TrainConfig
    from unmask.train.trainer import lr_at

    def cfg(total):
        return TrainConfig.model_validate({"optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10,
                                                     "schedule": "wsd", "decay_frac": 0.25},
                                           "train": {"max_steps": total}})

    short, long = cfg(100), cfg(400)
    lrs = [lr_at(s, short) for s in range(100)]
    assert lrs[:10] == [1e-3 * (s + 1) / 10 for s in range(10)]
    assert all(x == 1e-3 for x in lrs[10:75])
    assert all(a > b for a, b in zip(lrs[75:], lrs[76:]))  # strictly decaying over the last 25%
    assert lrs[-1] < 1.1e-4 and lr_at(100, short) == pytest.approx(1e-4)
    assert [lr_at(s, long) for s in range(75)] == lrs[:75]
    cosine = TrainConfig.model_validate({"optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 10},
                                         "train": {"max_steps": 100}})
    assert lr_at(50, cosine) < 1e-3  # the default schedule is unchanged: cosine from the warmup on


def test_time_limited_legs_then_longer_resume_equal_one_uninterrupted_run(tmp_path, corpus):
    """The GPU recipe: leg 1 stops on a time limit with a schedule too long to finish, leg 2 resumes with
    the real max_steps. With a wsd schedule the result is the run that knew max_steps from the start."""
    cfg = write_config(tmp_path / "c.toml", corpus, "bd3lm", steps=1000, micro=8, ckpt=100, eval_interval=100,
                       extra="ema = 0.9\n")
    cfg.write_text(cfg.read_text().replace("warmup_steps = 3", 'warmup_steps = 3\nschedule = "wsd"\ndecay_frac = 0.25'))
    leg1 = run_cli("train", str(cfg), "--out", str(tmp_path / "legs"), "--time-limit", "0", timeout=300)
    assert leg1.returncode == 0, leg1.stderr
    assert "time limit: stopped after step 1 of 1000" in leg1.stdout + leg1.stderr
    assert (tmp_path / "legs" / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (tmp_path / "legs" / "final").exists()
    import unmask
    partial = unmask.load(tmp_path / "legs" / "partial")  # the EMA so far, loadable as a model
    assert partial.config.objective == "bd3lm"

    leg2 = run_cli("train", str(cfg), "--out", str(tmp_path / "legs"), "--resume", "--max-steps", "12", timeout=300)
    assert leg2.returncode == 0, leg2.stderr
    one = run_cli("train", str(cfg), "--out", str(tmp_path / "one"), "--max-steps", "12", timeout=300)
    assert one.returncode == 0, one.stderr
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "legs" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(tmp_path / "one") == losses(tmp_path / "legs")


def test_train_tokens_restricts_the_windows_to_a_prefix_and_rejects_too_many(tmp_path, corpus, monkeypatch):
    from unmask.train import trainer

    seen = []

    def spy(tokens, *a, **kw):
        seen.append(len(tokens))
        raise KeyboardInterrupt  # enough: the trainer has chosen its token array

    monkeypatch.setattr(trainer, "global_batch", spy)
    cfg = write_config(tmp_path / "c.toml", corpus, "ar")
    cfg.write_text(cfg.read_text().replace("seq_len = 32", "seq_len = 32\ntrain_tokens = 500"))
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, tmp_path / "out")
    assert seen == [500]
    cfg.write_text(cfg.read_text().replace("train_tokens = 500", "train_tokens = 100000000"))
    with pytest.raises(UserError, match="data.train_tokens=100000000 but .* has only"):
        trainer.train(cfg, tmp_path / "out2")


@pytest.mark.parametrize("kind", ["bd3lm", "ar"])
def test_v4_gpu_recipe_is_v3_plus_the_fim_format(kind):
    """The shipped version-4 recipe (configs/gpu) must differ from version 3's (configs/gpu/v3) only in
    how FIM examples are made, so that the cards' v4-vs-v3 comparison measures the FIM format alone."""
    from unmask.config import load_train_config

    root = Path(__file__).resolve().parents[1] / "configs" / "gpu"
    v3, v4 = load_train_config(root / "v3" / f"coder-{kind}.toml"), load_train_config(root / f"coder-{kind}.toml")
    fim = {"fim_end": True, "fim_line_rate": 0.5, "fim_max_lines": 3, "fim_layout": "spm"}
    assert v4.data.model_dump() == {**v3.data.model_dump(), **fim}
    assert v4.model_dump(exclude={"data"}) == v3.model_dump(exclude={"data"})
