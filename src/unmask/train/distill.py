"""`unmask distill`: teach a diffusion model to commit more tokens per forward, on its own outputs.

1. Teacher trajectories. Prompts are cut from the corpus's train split at line ends: plain
   completions (the text up to the end of a line) and, for `fim_frac` of them, fill in the middle
   (1-3 whole lines cut out, in the model's FIM layout, as the infill evaluation asks). The model
   decodes each one itself, greedily and one token per forward (`policy="topk"`, `steps =
   max_tokens`): its most careful trajectory. They are written to `trajectories.jsonl` in the
   output directory, and `--trajectories FILE` reuses such a file instead of decoding again.
2. Certainty-forcing fine-tune (dParallel's recipe): the model's own diffusion objective on those
   completions with the prompt clean, every masked position scored against the teacher's token
   (cross-entropy), plus `certainty` times the entropy of the prediction at the masked positions
   the model already gets right. The first term holds the model to its careful trajectory; the
   second makes it sure of it, so that a confidence-threshold policy commits those positions in
   fewer steps. Masks are drawn per block as the count estimator draws them (k of a block's n
   answer positions, k uniform in 1..n): the states a block passes through while it is decoded.
3. Check. On held-out prompts: the loss terms with fixed noise, and the model's default decoding
   before and after (tokens per forward, and how many of its tokens equal the teacher's).
"""
from __future__ import annotations

import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DistillConfig, atomic_write_text
from ..diffusion import LossOutput, diffusion_logits, diffusion_masks, draw_noise, get_schedule
from ..errors import UserError
from .finetune import optimize
from .lora import add_lora, merge_lora
from .sft_data import Example, collate


@dataclass(frozen=True)
class Source:
    prompt: str
    suffix: str | None = None  # fill in the middle


def _cut(doc: str, rng: random.Random, fim: bool, budget: int) -> Source | None:
    """A prompt that ends at the end of a non-blank line followed by a non-blank line (what the model
    writes starts there), and for FIM a suffix after 1-3 lines; prefix + suffix within `budget` chars."""
    lines = doc.split("\n")
    ends = [k for k in range(1, len(lines) - 1) if lines[k].strip() and lines[k - 1].strip()]
    if not ends:
        return None
    k = rng.choice(ends)
    suffix = None
    if fim:
        rest = lines[min(len(lines), k + rng.randint(1, 3)):]
        kept, size = [], 0
        for line in rest:
            if size + len(line) + 1 > budget // 3:
                break
            kept.append(line)
            size += len(line) + 1
        suffix = "\n" + "\n".join(kept)
    room, a = budget - len(suffix or ""), k
    while a > 0 and sum(len(x) + 1 for x in lines[a - 1:k]) <= room:
        a -= 1
    if a == k:
        return None
    return Source("\n".join(lines[a:k]), suffix)


def draw_sources(corpus_dir: str | Path, n: int, fim_frac: float, budget: int, seed: int) -> list[Source]:
    """n prompts from documents sampled uniformly (seeded reservoir) from the corpus's train split."""
    from ..tokenizer.bpe import iter_split_texts

    rng, pool, seen, keep = random.Random(seed), [], 0, 2 * n
    for text in iter_split_texts(corpus_dir, "train"):
        if text.count("\n") < 4:
            continue
        seen += 1
        if len(pool) < keep:
            pool.append(text)
        elif (j := rng.randrange(seen)) < keep:
            pool[j] = text
    out, tries = [], 0
    while pool and len(out) < n and tries < 20 * n:
        tries += 1
        src = _cut(rng.choice(pool), rng, rng.random() < fim_frac, budget)
        if src is not None:
            out.append(src)
    if len(out) < n:
        raise UserError(f"{corpus_dir}: found prompts for only {len(out)} of {n} teacher runs in the train split; "
                        "lower --prompts or build a larger corpus")
    return out


def decode(model, sources: list[Source], max_tokens: int, concurrency: int, teacher: bool, log=print):
    """Each source decoded greedily: `teacher` one token per forward, else the model's default policy.
    Returns the outputs (RequestOutput) in source order."""
    from ..engine import Engine, SamplingParams

    engine = Engine(model, max_batch=concurrency)
    pending, inflight, outs = deque(range(len(sources))), {}, {}
    t0, last = time.perf_counter(), 0.0
    while pending or inflight:
        while pending and len(inflight) < concurrency:
            i = pending.popleft()
            s = sources[i]
            p = SamplingParams(max_tokens=max_tokens, temperature=0.0, heal=False, suffix=s.suffix,
                               **({"policy": "topk", "steps": max_tokens} if teacher else {}))
            inflight[engine.add_request(s.prompt, p, request_id=f"d{i}")] = i
        for ev in engine.step():
            if ev.finished and ev.request_id in inflight:
                outs[inflight.pop(ev.request_id)] = ev.output
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            log(f"distill: decoded {len(outs)}/{len(sources)} ({last - t0:.0f} s)")
    return [outs[i] for i in range(len(sources))]


def to_example(model, src: Source, ids: list[int], finished: bool, where: int) -> Example | None:
    """The prompt as the engine lays it out, then the teacher's tokens: ended by EOS when the teacher
    stopped, else cut back to a block boundary (no EOS is learned where the teacher did not stop)."""
    from ..frontend.prompt import layout_prompt

    c = model.config
    head, _ = layout_prompt(model, src.prompt, src.suffix)
    ids = list(ids)
    if finished:
        ids.append(c.eos_token_id)
    elif c.objective == "bd3lm":
        ids = ids[: len(ids) - (len(head) + len(ids)) % c.block_size]
    return Example(tuple(head) + tuple(ids), len(head), where) if ids else None


def distill_loss(net, examples: list[Example], gen: torch.Generator, cfg: DistillConfig, schedule, device
                 ) -> tuple[LossOutput, dict]:
    """Cross-entropy against the teacher's tokens at the masked answer positions, plus
    `cfg.certainty` x the mean entropy at those of them the model predicts right (argmax)."""
    c = net.config
    x0, prompt = collate(examples, c.objective, c.block_size, c.eos_token_id, c.pad_token_id)
    x0, prompt = x0.to(device), prompt.to(device)
    bs = c.block_size if c.objective == "bd3lm" else None
    noise = draw_noise(x0.shape[0], x0.shape[1], gen, block_size=bs, eps=cfg.diffusion.eps,
                       antithetic=cfg.diffusion.antithetic).to(device)
    masked, _ = diffusion_masks(x0, noise, schedule, bs, prompt, "count", cfg.diffusion.eps)
    logits = diffusion_logits(c.objective, net, x0, masked, c.mask_token_id, c.block_size).float()
    logp = logits.index_fill(-1, torch.tensor([c.mask_token_id], device=device), float("-inf")).log_softmax(-1)
    ce = -logp.gather(-1, x0[..., None])[..., 0]
    # -sum p log p; the [MASK] column's log p is -inf, and entr's gradient at p = 0 is not finite
    ent = -(logp.exp() * logp.clamp(min=-1e4)).sum(-1)
    right = masked & (logp.argmax(-1) == x0)
    n, n_right = masked.sum().clamp(min=1), right.sum().clamp(min=1)
    ce_mean = torch.where(masked, ce, 0.0).sum() / n
    ent_right = torch.where(right, ent, 0.0).sum() / n_right
    conf = torch.where(masked, logp.max(-1).values.exp(), 0.0).sum() / n
    stats = {"ce": float(ce_mean.detach()), "entropy_right": float(ent_right.detach()),
             "argmax_right": float(right.sum() / n), "confidence": float(conf.detach())}
    loss = ce_mean + cfg.certainty * ent_right
    return LossOutput(loss, torch.where(masked, ce, 0.0).detach().sum(), int(masked.sum())), stats


@torch.no_grad()
def held_out(net, examples: list[Example], cfg: DistillConfig, device, seed: int = 1234) -> dict | None:
    """distill_loss's terms over the held-out examples, with the same noise on every call (means over
    batches, weighted by masked positions)."""
    if not examples:
        return None
    was = net.training
    net.eval()
    gen, schedule = torch.Generator().manual_seed(seed), get_schedule(cfg.diffusion.schedule)
    total, weight = {}, 0
    for i in range(0, len(examples), cfg.batch_size):
        res, stats = distill_loss(net, examples[i:i + cfg.batch_size], gen, cfg, schedule, device)
        for k, v in stats.items():
            total[k] = total.get(k, 0.0) + v * res.tokens
        weight += res.tokens
    net.train(was)
    return {k: round(v / max(weight, 1), 5) for k, v in total.items()}


def decode_check(model, sources: list[Source], teacher: list[list[int]], cfg: DistillConfig) -> dict | None:
    """The model's default decoding on held-out prompts: tokens per forward, and the share of its
    tokens equal to the teacher's at the same place."""
    if not sources:
        return None
    was = model.net.training
    model.net.eval()
    outs = decode(model, sources, cfg.max_tokens, cfg.concurrency, teacher=False, log=lambda *_: None)
    model.net.train(was)
    tokens, nfe = sum(o.completion_tokens for o in outs), sum(o.nfe for o in outs)
    same = sum(sum(a == b for a, b in zip(o.token_ids, t)) for o, t in zip(outs, teacher))
    return {"prompts": len(sources), "tokens": tokens, "nfe": nfe, "tokens_per_forward": round(tokens / max(nfe, 1), 4),
            "same_as_teacher": round(same / max(sum(len(t) for t in teacher), 1), 4)}


def default_corpus() -> Path | None:
    """corpus/default (where the README builds it), under the working directory or the repository."""
    from ..pretrained import REPO_ROOT

    for d in (Path("corpus/default"), REPO_ROOT / "corpus" / "default"):
        if (d / "text" / "train.jsonl").is_file():
            return d
    return None


def _trajectories(model, corpus, reuse, out: Path, cfg: DistillConfig, log) -> list[dict]:
    if reuse is not None:
        path = Path(reuse)
        if not path.is_file():
            raise UserError(f"{path}: no such file; --trajectories takes a trajectories.jsonl written by unmask distill")
        recs = []
        for n, line in enumerate(path.open(encoding="utf-8"), 1):
            try:
                r = json.loads(line)
                recs.append({"prompt": str(r["prompt"]), "suffix": r["suffix"], "ids": [int(t) for t in r["ids"]],
                             "finished": bool(r["finished"])})
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                raise UserError(f"{path}:{n}: not a trajectory (prompt, suffix, ids, finished)") from None
        if len(recs) < 2:
            raise UserError(f"{path}: holds {len(recs)} trajectories; distilling needs at least 2")
        log(f"distill: {len(recs)} teacher trajectories from {path}")
        return recs
    if corpus is None:
        corpus = default_corpus()
    if corpus is None:
        raise UserError("no corpus to draw prompts from: build one with `unmask data build --out corpus/default` "
                        "(~3-5 min; it is then found by default), or pass --corpus DIR or --trajectories FILE")
    sources = draw_sources(corpus, cfg.prompts, cfg.fim_frac, cfg.prompt_chars, cfg.seed)
    log(f"distill: decoding {len(sources)} prompts one token per forward (the teacher), {cfg.max_tokens} tokens each")
    outs = decode(model, sources, cfg.max_tokens, cfg.concurrency, teacher=True, log=log)
    recs = [{"prompt": s.prompt, "suffix": s.suffix, "ids": list(o.token_ids),
             "finished": o.finish_reason == "stop"} for s, o in zip(sources, outs)]
    _write_trajectories(out, recs)
    return recs


def distill(model_dir, out, cfg: DistillConfig, *, corpus=None, trajectories=None, device: str = "cpu",
            log=print) -> dict:
    """The teacher's trajectories go to OUT/trajectories.jsonl as soon as they exist (a failed run can
    be retried from them with `trajectories=`); the model appears in OUT whole, at the end."""
    from ..pretrained import load, save

    out = Path(out)
    if out.exists() and any(f.name != "trajectories.jsonl" for f in out.iterdir()):
        raise UserError(f"{out}: already exists and is not empty; choose another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load(model_dir, device=device)
    net = model.net
    if model.config.objective not in ("bd3lm", "mdlm"):
        raise UserError(f"{model.path}: is an {model.config.objective} model; distill makes a diffusion model "
                        "commit more tokens per forward (an AR model commits one)")
    if cfg.block_size and model.config.objective != "bd3lm":
        raise UserError(f"--block-size is for block-diffusion models; {model.path} is an {model.config.objective} model")
    recs = _trajectories(model, corpus, trajectories, out, cfg, log)
    val_first = _split(len(recs), cfg)[0]
    check_before = decode_check(model, [Source(recs[i]["prompt"], recs[i]["suffix"]) for i in val_first],
                                [recs[i]["ids"] for i in val_first], cfg)
    if cfg.block_size and cfg.block_size != model.config.block_size:
        # A larger block: the student learns to write the teacher's tokens with more of them masked at once.
        log(f"distill: block size {model.config.block_size} -> {cfg.block_size}")
        model.config.block_size = cfg.block_size
        model.generation = model.generation.model_copy(update={"block_size": cfg.block_size})
    examples = [to_example(model, Source(r["prompt"], r["suffix"]), r["ids"], r["finished"], i)
                for i, r in enumerate(recs)]
    keep = {i for i, e in enumerate(examples) if e is not None and len(e.ids) <= model.config.max_seq_len}
    val_idx, train_idx = _split(len(recs), cfg)
    val_idx, train_idx = [i for i in val_idx if i in keep], [i for i in train_idx if i in keep]
    val, train = [examples[i] for i in val_idx], [examples[i] for i in train_idx]
    val_src = [Source(recs[i]["prompt"], recs[i]["suffix"]) for i in val_first]  # the check before ran on these
    val_teacher = [recs[i]["ids"] for i in val_first]
    steps = max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))

    torch.manual_seed(cfg.seed)
    params = add_lora(net, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout) if cfg.lora \
        else list(net.parameters())
    n_train = sum(p.numel() for p in params)
    schedule = get_schedule(cfg.diffusion.schedule)
    before = held_out(net, val, cfg, device)
    log(f"distill: {len(train)} training trajectories, {len(val)} held out ({len(recs) - len(keep)} empty or "
        f"too long left out); {steps} steps of {cfg.batch_size}; "
        f"{'LoRA rank ' + str(cfg.lora_rank) if cfg.lora else 'all weights'} ({n_train:,} trainable parameters)")
    if before is not None:
        log(f"held out before: {before}; default decoding {check_before}")
    history, seconds = optimize(net, params, train, cfg, steps,
                                lambda batch, gen: distill_loss(net, batch, gen, cfg, schedule, device)[0], log)
    merged = merge_lora(net) if cfg.lora else 0
    net.eval()
    after, check_after = held_out(net, val, cfg, device), decode_check(model, val_src, val_teacher, cfg)
    if after is not None:
        log(f"held out after: {after}; default decoding {check_after}")
    summary = {"model": str(model.path), "corpus": None if corpus is None else str(corpus),
               "trajectories": len(recs), "left_out": len(recs) - len(keep), "train": len(train),
               "held_out": len(val), "held_out_prompts": val_first, "steps": steps, "trainable_parameters": n_train,
               "seconds": seconds, "held_out_before": before, "held_out_after": after,
               "decoding_before": check_before, "decoding_after": check_after, "lora_layers_merged": merged,
               "config": cfg.model_dump(), "history": history}
    save(model, out, card=_card(model, cfg, summary), dtype=torch.float32, keep=("trajectories.jsonl",))
    if trajectories is not None and not (out / "trajectories.jsonl").exists():
        _write_trajectories(out, recs)
    atomic_write_text(out / "distill.json", json.dumps(summary, indent=1) + "\n")
    log(f"saved {out} ({seconds:.0f} s of training)")
    return summary


def _split(n: int, cfg: DistillConfig) -> tuple[list[int], list[int]]:
    """(held-out, training) indices of n trajectories: a seeded shuffle, the first val_frac held out."""
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    n_val = min(n - 1, round(cfg.val_frac * n)) if cfg.val_frac > 0 else 0
    return sorted(order[:n_val]), order[n_val:]


def _write_trajectories(out: Path, recs: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "trajectories.jsonl", "".join(json.dumps(r) + "\n" for r in recs))


def _card(model, cfg: DistillConfig, s: dict) -> str:
    how = f"LoRA rank {cfg.lora_rank} (merged)" if cfg.lora else "all weights"
    lines = [f"# Distilled from {Path(str(model.path)).name}", "",
             f"`unmask distill`: {s['train']} of the model's own greedy one-token-per-forward trajectories "
             f"({cfg.max_tokens} tokens, {cfg.fim_frac:.0%} fill-in-the-middle), then {s['steps']} steps of "
             f"{cfg.batch_size} of cross-entropy to them plus {cfg.certainty:g} x the entropy where the model is "
             f"right (certainty forcing), learning rate {cfg.learning_rate:g}, {how}; {s['seconds']:.0f} s.", ""]
    for when in ("before", "after"):
        d = s[f"decoding_{when}"]
        if d:
            lines.append(f"- {when}: default decoding on {d['prompts']} held-out prompts, {d['tokens_per_forward']} "
                         f"tokens per forward, {d['same_as_teacher']:.1%} of tokens equal to the teacher's")
    lines += ["", "The full recipe and the held-out figures are in `distill.json`."]
    return "\n".join(lines) + "\n"
