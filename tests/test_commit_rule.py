"""The learned commit rule: row-independent features, a classifier that learns a separable rule, a
stored rule that loads back exactly (and refuses another version), the `learned` policy batched ==
alone in the engine, and a clear refusal for a model without a rule."""
from __future__ import annotations

import json

import pytest
import torch

import unmask
from conftest import random_pretrained
from unmask.config import DistillConfig
from unmask.engine import Engine, SamplingParams
from unmask.errors import UserError
from unmask.sampling.commit_rule import CARD, FEATURES, WEIGHTS, CommitRule, features
from unmask.train.commit_rule import auc, fit, operating_point, train_commit_rule
from unmask.train.distill import Source, decode

pytestmark = pytest.mark.usefixtures("single_thread")


def _rows(B=6, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(B, T, generator=g, dtype=torch.float64)
    masked = torch.rand(B, T, generator=g) < 0.6
    masked[:, 2] = True
    return conf, conf * torch.rand(B, T, generator=g, dtype=torch.float64), torch.rand(B, T, generator=g,
                                                                                        dtype=torch.float64), masked


def test_features_are_row_independent():
    conf, margin, ent, masked = _rows()
    whole = features(conf, margin, ent, masked)
    assert whole.shape == (6, 5, len(FEATURES))
    for i in range(6):
        alone = features(conf[i:i + 1], margin[i:i + 1], ent[i:i + 1], masked[i:i + 1])
        assert torch.equal(alone[0], whole[i])
    # what the features say about a known row: open positions 1 and 3 of 4, conf .9 and .5
    f = features(torch.tensor([[1.0, 0.9, 1.0, 0.5]]), torch.zeros(1, 4), torch.zeros(1, 4),
                 torch.tensor([[False, True, False, True]]))[0]
    col = {n: f[:, i].tolist() for i, n in enumerate(FEATURES)}
    assert col["open_fraction"][1] == 2 / 8 and col["confidence_rank"][1] == 0 and col["confidence_rank"][3] == 1
    assert col["leftmost"][1] == 1 and col["leftmost"][3] == 0
    assert col["left_committed"][1] == 1 and col["right_open"][1] == 0 and col["right_open"][3] == 1
    assert col["right_confidence"][3] == 0  # the future, right of the window, is unwritten


def test_auc_and_fit():
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])) == 0.75
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([False, True])) == 0.5  # ties count half
    g = torch.Generator().manual_seed(1)
    X = torch.rand(4000, len(FEATURES), generator=g, dtype=torch.float64)
    y = (X[:, 4] + 0.5 * X[:, 7]) > 0.8  # a rule confidence alone cannot see
    rule = fit(X[:3000], y[:3000], steps=300)
    p = torch.sigmoid(rule.logit(X[3000:])).detach()
    assert auc(p, y[3000:]) > 0.97 and auc(X[3000:, 0], y[3000:]) < 0.6
    op = operating_point(p, X[3000:, 0], y[3000:], 0.7)
    assert op["learned_commits"] > op["threshold_commits"] * 0.5 and 0 <= op["learned_threshold"] <= 1


def test_rule_round_trip_and_version_check(tmp_path):
    rule = CommitRule.init(8, seed=3)
    rule.info = {"auc_learned": 0.9}
    rule.save(tmp_path)
    back = CommitRule.load(tmp_path)
    for k, v in rule.tensors().items():
        assert torch.equal(v, getattr(back, k))
    assert back.info["auc_learned"] == 0.9 and back.info["features"] == list(FEATURES)
    conf, margin, ent, masked = _rows()
    assert torch.equal(rule.score(conf, margin, ent, masked), back.score(conf, margin, ent, masked))
    card = json.loads((tmp_path / CARD).read_text())
    (tmp_path / CARD).write_text(json.dumps({**card, "features": ["confidence"]}))
    with pytest.raises(UserError, match="not a commit rule of this version"):
        CommitRule.load(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"junk")
    with pytest.raises(UserError, match="unreadable"):
        CommitRule.load(tmp_path)
    assert CommitRule.load(tmp_path / "none") is None


def test_learned_policy_in_the_engine(tok, tmp_path):
    d = tmp_path / "m"
    unmask.save(random_pretrained(tok, "block"), d, dtype=torch.float32)
    with pytest.raises(UserError, match="the learned policy needs a commit rule stored with the model"):
        Engine(unmask.load(d)).generate("def f(x):", SamplingParams(max_tokens=8, policy="learned"))
    # the model's own careful decodings, as `unmask commit-rule --corpus` makes them
    srcs = [Source(p) for p in ("def f(x):", "class A:", "import os", "def g(a, b):", "x = 1", "y = [",
                                "return", "for i in", "if x:", "while True:")]
    outs = decode(unmask.load(d), srcs, 12, 4, teacher=True, log=lambda *_: None)
    traj = tmp_path / "t.jsonl"
    traj.write_text("".join(json.dumps({"prompt": s.prompt, "suffix": None, "ids": o.token_ids,
                                        "finished": o.finish_reason == "stop"}) + "\n" for s, o in zip(srcs, outs)))
    info = train_commit_rule(d, DistillConfig(batch_size=4), trajectories=traj, draws=2, hidden=8, log=lambda *_: None)
    assert info["train_positions"] > 0 and (d / WEIGHTS).is_file() and (d / CARD).is_file()
    assert 0 < info["held_out_final_share"] <= 1
    m = unmask.load(d)
    assert m.commit_rule is not None
    prompts = ["def add(a, b):", "class Stack:", "    return", "def f(x):\n    y = x"]
    p = SamplingParams(max_tokens=12, temperature=0.0, policy="learned", threshold=0.5)
    together = Engine(m, max_batch=4).generate(prompts, p)
    alone = [Engine(m, max_batch=1).generate(q, p)[0] for q in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert all(o.completion_tokens == 12 or o.finish_reason == "stop" for o in together)
    # a stricter threshold commits fewer positions per forward
    strict = Engine(m).generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, policy="learned",
                                                        threshold=0.999999))
    assert sum(o.nfe for o in strict) >= sum(o.nfe for o in together)
