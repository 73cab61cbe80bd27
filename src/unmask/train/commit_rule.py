"""`unmask commit-rule`: train the learned policy's classifier for one model and store it beside
its weights (sampling/commit_rule.py says what it computes).

Data: the model's own careful trajectories (greedy, one token per forward: what it "finally
writes"), decoded from corpus prompts as `unmask distill` does, or read from a trajectories.jsonl
of the same model. Each is laid out as the engine lays it out; its blocks are masked as a block is
while it is decoded (k of a block's n positions, k uniform in 1..n, `draws` times), one batched
forward gives every masked position's proposal, and the label is whether that proposal equals the
trajectory's token. The classifier is fitted on 80% of the trajectories and measured on the rest:
its ROC AUC against confidence alone, and how many positions it would commit at the precision the
model's default threshold reaches.
"""
from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import DistillConfig
from ..diffusion import diffusion_logits, diffusion_masks, draw_noise, get_schedule
from ..errors import UserError
from ..sampling.commit_rule import CommitRule, features
from ..sampling.policies import propose_batch
from .distill import Source, _trajectories, to_example
from .sft_data import Example, collate


@torch.no_grad()
def collect(model, examples: list[Example], draws: int, batch_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y): features of every masked answer position in `draws` random block states of each
    example, and whether its proposal equals the example's token."""
    c, net = model.config, model.net
    bs = model.generation.block_size if c.objective == "mdlm" else c.block_size
    gen, schedule = torch.Generator().manual_seed(seed), get_schedule("linear")
    xs, ys = [], []
    dev = next(net.parameters()).device
    for _ in range(draws):
        for i in range(0, len(examples), batch_size):
            x0, prompt = collate(examples[i:i + batch_size], c.objective, bs, c.eos_token_id, c.pad_token_id)
            L = x0.shape[1] // bs * bs
            x0, prompt = x0[:, :L].to(dev), prompt[:, :L].to(dev)
            noise = draw_noise(x0.shape[0], L, gen, block_size=bs).to(dev)
            masked, _ = diffusion_masks(x0, noise, schedule, bs, prompt, "count", 1e-3)
            logits = diffusion_logits(c.objective, net, x0, masked, c.mask_token_id, c.block_size)
            rows = masked.view(-1, bs).any(-1)
            lg, mk, tgt = logits.reshape(-1, bs, logits.shape[-1])[rows], masked.view(-1, bs)[rows], x0.view(-1, bs)[rows]
            n = lg.shape[0]
            prop = propose_batch(lg, c.mask_token_id, torch.zeros(n, dtype=torch.float64),
                                 torch.ones(n, dtype=torch.float64), [None] * n)
            xs.append(features(prop.confidence, prop.margin, prop.entropy, mk)[mk].cpu())
            ys.append((prop.tokens == tgt)[mk].cpu())
    return torch.cat(xs), torch.cat(ys)


def fit(X: torch.Tensor, y: torch.Tensor, hidden: int = 32, steps: int = 400, lr: float = 0.01,
        seed: int = 0) -> CommitRule:
    """Full-batch Adam on the binary cross-entropy; features standardised by their training statistics."""
    rule = CommitRule.init(hidden, seed)
    rule.mean, rule.std = X.mean(0), X.std(0).clamp(min=1e-6)
    params = [rule.w1, rule.b1, rule.w2, rule.b2]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    target = y.to(torch.float64)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(rule.logit(X), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    return rule


def auc(score: torch.Tensor, y: torch.Tensor) -> float:
    """ROC AUC (the chance a random positive outscores a random negative; ties count half)."""
    pos, neg = int(y.sum()), int((~y).sum())
    if not pos or not neg:
        return float("nan")
    s, order = torch.sort(score.to(torch.float64))
    _, inv, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts + 1
    ranks = torch.empty(len(score), dtype=torch.float64)
    ranks[order] = (first + (counts - 1) / 2.0).to(torch.float64)[inv]  # average ranks over ties
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def operating_point(rule_p: torch.Tensor, conf: torch.Tensor, y: torch.Tensor, tau: float) -> dict:
    """At the precision that `confidence >= tau` reaches: the share of positions each rule commits,
    and the rule's own threshold for that precision."""
    base = conf >= tau
    prec = float(y[base].double().mean()) if base.any() else 1.0
    s, order = torch.sort(rule_p, descending=True)
    hits = torch.cumsum(y[order].double(), 0) / torch.arange(1, len(s) + 1, dtype=torch.float64)
    ok = (hits >= prec).nonzero()
    k = int(ok.max()) + 1 if len(ok) else 0
    return {"precision": round(prec, 4), "threshold_commits": round(float(base.double().mean()), 4),
            "learned_commits": round(k / len(s), 4), "learned_threshold": round(float(s[k - 1]), 4) if k else 1.0}


def train_commit_rule(model_dir, cfg: DistillConfig, *, corpus=None, trajectories=None, draws: int = 4,
                      hidden: int = 32, device: str = "cpu", log=print) -> dict:
    from ..pretrained import load

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load(model_dir, device=device)
    if model.config.objective not in ("bd3lm", "mdlm"):
        raise UserError(f"{model.path}: is an {model.config.objective} model; a commit rule picks which of a "
                        "diffusion model's proposals to commit")
    t0 = time.perf_counter()
    out = Path(model.path)
    with tempfile.TemporaryDirectory() as tmp:  # trajectories decoded here are not kept
        recs = _trajectories(model, corpus, trajectories, Path(tmp), cfg, log)
    examples = [e for i, r in enumerate(recs)
                if (e := to_example(model, Source(r["prompt"], r["suffix"]), r["ids"], r["finished"], i)) is not None
                and len(e.ids) <= model.config.max_seq_len]
    random.Random(cfg.seed).shuffle(examples)
    n_val = max(1, len(examples) // 5)
    if len(examples) < 4:
        raise UserError(f"only {len(examples)} usable trajectories; a commit rule needs at least 4")
    Xt, yt = collect(model, examples[n_val:], draws, cfg.batch_size, cfg.seed)
    Xv, yv = collect(model, examples[:n_val], draws, cfg.batch_size, cfg.seed + 1)
    log(f"commit-rule: {len(yt):,} training positions ({float(yt.double().mean()):.1%} final), {len(yv):,} held out")
    rule = fit(Xt, yt, hidden=hidden, seed=cfg.seed)
    with torch.no_grad():
        pv = torch.sigmoid(rule.logit(Xv))
    conf = Xv[:, 0]
    tau = model.generation.threshold if model.generation.policy == "threshold" else 0.9
    info = {"trajectories": len(recs), "train_positions": len(yt), "held_out_positions": len(yv),
            "held_out_final_share": round(float(yv.double().mean()), 4),
            "auc_learned": round(auc(pv, yv), 4), "auc_confidence": round(auc(conf, yv), 4),
            f"at_threshold_{tau:g}": operating_point(pv, conf, yv, tau), "draws": draws, "hidden": hidden,
            "seconds": round(time.perf_counter() - t0, 1)}
    rule.info = info
    rule.save(out)
    log(f"commit-rule: held-out AUC {info['auc_learned']} (confidence alone {info['auc_confidence']}); "
        f"at threshold {tau:g}: {info[f'at_threshold_{tau:g}']}; saved to {out}")
    return info
