"""`unmask finetune`: supervised fine-tuning of a saved model on user examples, all weights or LoRA.

The loss is the model's own objective with the prompt held clean: MDLM/LLaDA and BD3-LM noise and
score only the answer (LLaDA's SFT recipe), AR scores only the answer's next tokens. A share of
the examples is held out, and its loss is measured with fixed noise before and after training, so
the two numbers compare like for like. The result is an ordinary checkpoint (adapters merged) with
a model card that records the recipe and those numbers.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import time
from pathlib import Path

import torch

from ..config import FinetuneConfig, atomic_write_text
from ..diffusion import compute_loss, draw_noise, get_schedule
from ..diffusion.losses import LossOutput
from . import distributed, parallel
from ..errors import UserError
from . import lora
from .lora import add_lora, merge_lora
from .sft_data import Example, collate, load_examples


# The default peak learning rate, a power law in the parameter count through two anchors. All
# weights: 2e-3 for the 28M embedded model (measured: bench/facts.py, 200 facts; 5e-5 taught 1 of
# 200, 5e-4 12, 5e-3 diverged) and 2.5e-5 at 8B (LLaDA-8B's published SFT rate). LoRA (rank 64,
# alpha 128): 2e-3 at 28M (measured on the same bench: 1e-3 taught 87, 2e-3 128, 5e-3 diverged) and
# 2e-4 at 8B, the rate LoRA fine-tunes of 7-8B models commonly use (not measured here).
LR_ANCHORS = ((28e6, 2e-3), (8e9, 2.5e-5))
LORA_LR_ANCHORS = ((28e6, 2e-3), (8e9, 2e-4))


def default_lr(n_params: int, lora: bool) -> float:
    (n0, lr0), (n1, lr1) = LORA_LR_ANCHORS if lora else LR_ANCHORS
    slope = math.log(lr1 / lr0) / math.log(n1 / n0)
    return min(lr0, max(lr1 / 4, lr0 * (n_params / n0) ** slope))


def _lr(step: int, total: int, cfg: FinetuneConfig) -> float:
    peak, warm = cfg.learning_rate, max(1, round(cfg.warmup_frac * total))
    if step < warm:
        return peak * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    floor = peak * cfg.min_lr_frac
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


class _Batches:
    """Examples in a fresh seeded order every epoch, cut into batches (the last of an epoch may be short)."""

    def __init__(self, examples: list[Example], size: int, seed: int):
        self.examples, self.size, self.rng = examples, size, random.Random(seed)
        self.order: list[int] = []

    def next(self) -> list[Example]:
        if not self.order:
            self.order = list(range(len(self.examples)))
            self.rng.shuffle(self.order)
        take, self.order = self.order[: self.size], self.order[self.size:]
        return [self.examples[i] for i in take]


def _loss(net, examples: list[Example], gen: torch.Generator, cfg: FinetuneConfig, schedule, device, c=None,
          rank: int = 0, world: int = 1):
    """The loss of a batch. With several ranks every rank lays out the whole batch and draws its noise
    (the same on each), then computes its own share of the rows; the share's mean is scaled so that the
    ranks' average (what DDP and FSDP reduce gradients to) is the whole batch's mean."""
    c = c or net.config
    if c.objective != "ar" and cfg.noise_samples > 1:  # each example noised several times (FinetuneConfig)
        examples = [e for e in examples for _ in range(cfg.noise_samples)]
    x0, prompt = collate(examples, c.objective, c.block_size, c.eos_token_id, c.pad_token_id)
    noise = None
    if c.objective != "ar":
        noise = draw_noise(x0.shape[0], x0.shape[1], gen, block_size=c.block_size if c.objective == "bd3lm" else None,
                           eps=cfg.diffusion.eps, antithetic=cfg.diffusion.antithetic)
        if cfg.noise_samples > 1 and cfg.rotate_noise:
            noise = rotate_copies(noise, cfg.noise_samples)
    n = len(examples)
    lo, hi = n * rank // world, n * (rank + 1) // world
    scale = (hi - lo) * world / n
    if world > 1:
        if hi == lo:  # fewer rows than ranks (an epoch's short last batch): a row with no weight
            lo, hi, scale = 0, 1, 0.0
        x0, prompt, noise = x0[lo:hi], prompt[lo:hi], None if noise is None else noise[lo:hi]
    res = compute_loss(c.objective, net, x0.to(device), None if noise is None else noise.to(device), schedule,
                       c.mask_token_id, c.block_size, prompt_mask=prompt.to(device), estimator=cfg.diffusion.estimator,
                       eps=cfg.diffusion.eps)
    if world > 1:
        res = LossOutput(res.loss * scale, res.nll, res.tokens)
    return res


def rotate_copies(noise, k: int):
    """Spread the k noised copies of each example (adjacent rows) over the noise instead of drawing
    them independently. Each copy alone is noised exactly as before (a time from the batch's
    stratified draw, iid U[0, 1) uniforms), so the loss's expectation is unchanged, but:
    - times: copy j of every example takes the j-th k-quantile stratum of the batch's times, so every
      example is seen lightly, half and heavily masked in each step, not k times at one level;
    - tokens: the copies share one row of uniforms shifted by j/k (mod 1), so which tokens a copy
      masks rotates through the answer and each token is masked in a spread of copies.
    """
    from ..diffusion.masking import Noise

    B, L = noise.u.shape
    t = noise.t.view(k, B // k, *noise.t.shape[1:]).transpose(0, 1).reshape(noise.t.shape)
    base = noise.u.view(B // k, k, L)[:, :1]
    shift = torch.arange(k, dtype=noise.u.dtype).view(1, k, 1) / k
    return Noise(t, ((base + shift) % 1.0).reshape(B, L))


@torch.no_grad()
def held_out_loss(net, examples: list[Example], cfg: FinetuneConfig, device, seed: int = 1234) -> float | None:
    """Nats per answer token over the held-out examples, with the same noise on every call."""
    if not examples:
        return None
    was = net.training
    net.eval()
    gen, schedule = torch.Generator().manual_seed(seed), get_schedule(cfg.diffusion.schedule)
    nll = tokens = 0.0
    for i in range(0, len(examples), cfg.batch_size):
        res = _loss(net, examples[i:i + cfg.batch_size], gen, cfg, schedule, device)
        nll, tokens = nll + float(res.nll), tokens + res.tokens
    net.train(was)
    return nll / max(tokens, 1)


class Checkpoints:
    """Where a fine-tune keeps its checkpoints (train/checkpoint.py's format: safetensors and JSON) and
    what must match for `--resume` to continue it exactly: the recipe and the data file's bytes."""

    def __init__(self, root: Path, every: int, fingerprint: dict, resume: bool, d=None):
        self.root, self.every, self.fingerprint, self.resume = root, every, fingerprint, resume
        self.d = d or distributed.Dist()

    def save(self, step, net, opt, batches, gen, history) -> None:
        """Every rank calls it (gathering the full state is a collective); rank 0 writes."""
        from .checkpoint import save_full_checkpoint

        model, optim = parallel.full_state(net, opt)
        if self.d.main:
            rng = batches.rng.getstate()
            groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            save_full_checkpoint(self.root, step, model, optim, groups, {
                "fingerprint": self.fingerprint, "history": history, "world": self.d.world,
                "batches": {"order": batches.order, "rng": [rng[0], list(rng[1]), rng[2]]},
                "generator": gen.get_state().tolist()})
        self.d.barrier()

    def restore(self, net, opt, batches, gen) -> tuple[int, list[dict]]:
        """The step to continue from (0 when not resuming) and the history so far."""
        from .checkpoint import latest_checkpoint, load_full_checkpoint

        if not self.resume:
            return 0, []
        ck = latest_checkpoint(self.root)
        if ck is None:
            raise UserError(f"--resume: {self.root} holds no checkpoint; run without --resume to start")
        model, optim, meta = load_full_checkpoint(ck)
        theirs = meta.get("fingerprint", {})
        for key in ("data_sha256", "model", "config"):
            if theirs.get(key) != self.fingerprint[key]:
                raise UserError(f"--resume: {ck} was written by another fine-tune ({key} differs); resume with the "
                                "same --model, --data and settings, or choose another --out")
        parallel.load_full_state(net, opt, model, optim, meta["param_groups"])
        b = meta["batches"]
        batches.order = list(b["order"])
        batches.rng.setstate((b["rng"][0], tuple(b["rng"][1]), b["rng"][2]))
        gen.set_state(torch.tensor(meta["generator"], dtype=torch.uint8))
        return meta["step"], meta["history"]


class Stopped(Exception):
    """The time limit ended a fine-tune early, after a checkpoint (continue it with --resume)."""

    def __init__(self, step: int, steps: int):
        super().__init__(f"stopped after step {step} of {steps}")
        self.step, self.steps = step, steps


def optimize(net, params, train: list[Example], cfg: FinetuneConfig, steps: int, loss_fn, log=print,
             ckpt: Checkpoints | None = None, d=None, time_limit: float | None = None) -> tuple[list[dict], float]:
    """`steps` AdamW steps (warmup, cosine) on batches of `train` in a fresh seeded order every epoch;
    loss_fn(examples, generator) -> LossOutput. With `ckpt`, a checkpoint every `ckpt.every` steps,
    and a resumed run continues from the last one exactly (weights, optimizer, batch order, noise).
    d: the ranks (train/distributed.py); the logged loss is the whole batch's. time_limit: seconds, after
    which the run checkpoints and raises Stopped (every rank at the same step).
    Returns the logged history and the seconds spent."""
    d = d or distributed.Dist()
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    cuda = next(net.buffers()).is_cuda
    # bf16 autocast on CUDA (FSDP brings its own mixed-precision policy instead)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and not parallel.is_sharded(net) \
        else contextlib.nullcontext()
    batches, gen = _Batches(train, cfg.batch_size, cfg.seed), torch.Generator().manual_seed(cfg.seed + 1)
    start, history = ckpt.restore(net, opt, batches, gen) if ckpt is not None else (0, [])
    if start:
        log(f"resumed from step {start} of {steps}")
    t0 = time.perf_counter()
    net.train()
    for step in range(start, steps):
        lr = _lr(step, steps, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        with autocast:
            res = loss_fn(batches.next(), gen)
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(d.mean(res.loss.detach()))
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} at step {step + 1}; lower --lr")
        if (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": loss, "lr": lr, "seconds": time.perf_counter() - t0})
            log(f"step {step + 1}/{steps}: loss {loss:.4f}, lr {lr:.2e}")
        late = time_limit is not None and d.any_true(time.perf_counter() - t0 > time_limit)
        if ckpt is not None and ((step + 1) % ckpt.every == 0 or late) and step + 1 < steps:
            ckpt.save(step + 1, net, opt, batches, gen, history)
        if late and step + 1 < steps and ckpt is not None:
            raise Stopped(step + 1, steps)
    return history, time.perf_counter() - t0


def finetune(model_dir: str | Path | None, data: str | Path, out: str | Path, cfg: FinetuneConfig,
             device: str = "cpu", log=print, resume: bool = False, time_limit: float | None = None,
             save_adapter: bool = False) -> dict:
    """The model is written to `out`; its checkpoints go to `out/checkpoints` while it trains (and
    are removed once the model is saved). resume: continue the fine-tune whose checkpoints are there.
    save_adapter (LoRA): also the adapters alone in `out/adapter`, loadable onto the same base only
    (`unmask.load(base, adapter=out/"adapter")`)."""
    import hashlib
    import shutil

    from ..pretrained import load, save

    out = Path(out)
    ckpt_root = out / "checkpoints"
    if resume and not (ckpt_root / "latest").exists():
        raise UserError(f"--resume: {out} holds no fine-tune checkpoint; run without --resume to start")
    if not resume and out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: already exists and is not empty; choose another --out"
                        + (" (or --resume: it holds checkpoints)" if (ckpt_root / "latest").exists() else ""))
    if save_adapter and not cfg.lora:
        raise UserError("--save-adapter exports LoRA adapters; add --lora (an all-weights fine-tune has none)")
    d = distributed.init()  # torchrun: one process per rank (train/parallel.py applies DDP or FSDP)
    mode = cfg.parallel if cfg.parallel != "auto" else ("ddp" if d.world > 1 else "none")
    if d.world > 1:
        device = str(d.device)
        if cfg.batch_size < d.world:
            raise UserError(f"--batch-size {cfg.batch_size} is smaller than the {d.world} ranks; each rank needs a row")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = load(model_dir, device=device)
    net, mc = model.net, model.config
    if not cfg.lr:  # the default peak learning rate follows the model's size (default_lr)
        cfg = cfg.model_copy(update={"lr": default_lr(sum(p.numel() for p in net.parameters()), cfg.lora)})
    seq_len = cfg.seq_len or mc.max_seq_len
    if seq_len > mc.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's max_seq_len {mc.max_seq_len}")
    examples, skipped = load_examples(model, data, seq_len, cfg.skip_long)
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    n_val = min(len(examples) - 1, round(cfg.val_frac * len(examples))) if cfg.val_frac > 0 else 0
    val = [examples[i] for i in sorted(order[:n_val])]  # file order: the held-out loss is reproducible from the lines
    train = [examples[i] for i in order[n_val:]]
    steps = max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))

    torch.manual_seed(cfg.seed)
    base_print = lora.base_fingerprint(net) if save_adapter else None
    if cfg.lora:
        params = add_lora(net, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
    else:
        params = list(net.parameters())
    n_train = sum(p.numel() for p in params)
    schedule = get_schedule(cfg.diffusion.schedule)
    run = parallel.parallelize(net, mode, d.world, torch.device(device), cfg.activation_checkpointing)
    if d.world > 1 or mode == "fsdp":
        params = [p for p in net.parameters() if p.requires_grad]  # FSDP's sharded parameters replace the originals
    if not d.main:
        log = lambda *_: None  # noqa: E731  (rank 0 speaks for all)
    before = held_out_loss(net, val, cfg, device)
    if skipped:
        log(f"finetune: left out {skipped} examples longer than {seq_len} tokens")
    log(f"finetune: {len(train)} training examples, {len(val)} held out; {steps} steps of {cfg.batch_size}; "
        f"{'LoRA rank ' + str(cfg.lora_rank) if cfg.lora else 'all weights'} ({n_train:,} trainable parameters)")
    if before is not None:
        log(f"held-out loss before: {before:.4f} nats/answer token")
    fingerprint = {"data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(), "model": str(model.path),
                   "config": cfg.model_dump(exclude={"threads", "parallel", "activation_checkpointing", "ckpt_interval"})}
    ckpt = Checkpoints(ckpt_root, cfg.ckpt_interval or max(25, steps // 10), fingerprint, resume, d)
    try:
        history, seconds = optimize(net, params, train, cfg, steps,
                                    lambda batch, gen: _loss(run, batch, gen, cfg, schedule, device, mc, d.rank, d.world),
                                    log, ckpt, d, time_limit)
    except Stopped as e:
        log(f"time limit: {e}; continue with --resume (checkpoint in {ckpt_root})")
        model = net = run = params = None  # noqa: F841  (the wrappers go before the process group)
        _shutdown(d)
        return {"stopped_at": e.step, "steps": e.steps, "rank": d.rank}
    after = held_out_loss(net, val, cfg, device)
    if parallel.is_sharded(net):  # gather the shards into one plain model on rank 0
        from ..model import Transformer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        net = Transformer(mc)
        if cfg.lora:
            add_lora(net, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout)
        net.load_state_dict(full, strict=False)
        model.net = net
    if not d.main:
        model = net = run = params = None  # noqa: F841
        _shutdown(d)
        return {"steps": steps, "history": history, "rank": d.rank}
    adapter = lora.adapter_state(net) if save_adapter else None
    merged = merge_lora(net) if cfg.lora else 0
    net.eval()
    summary = {"model": str(model.path), "data": str(data), "examples": len(examples), "skipped_long": skipped,
               "train_examples": len(train),
               "held_out_examples": len(val), "held_out_lines": [e.line for e in val], "steps": steps, "trainable_parameters": n_train,
               "held_out_loss_before": before, "held_out_loss_after": after, "seconds": seconds,
               "lora_layers_merged": merged, "config": cfg.model_dump(), "history": history}
    save(model, out, card=_card(model, data, cfg, summary), dtype=torch.float32)
    if adapter is not None:
        lora.save_adapter(adapter, out / "adapter", base=str(model.path), fingerprint=base_print,
                          rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets)
        summary["adapter"] = str(out / "adapter")
    atomic_write_text(out / "finetune.json", json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(ckpt_root, ignore_errors=True)  # the model is saved: nothing left to resume
    if after is not None:
        log(f"held-out loss after: {after:.4f} nats/answer token")
    log(f"saved {out} ({seconds:.0f} s of training)")
    run = params = None  # noqa: F841
    _shutdown(d)
    return summary


def _shutdown(d) -> None:
    distributed.leave()  # the callers dropped their DDP / FSDP wrappers first


def _card(model, data, cfg: FinetuneConfig, s: dict) -> str:
    how = (f"LoRA rank {cfg.lora_rank}, alpha {cfg.lora_alpha:g} on {', '.join(cfg.lora_targets)} (merged)"
           if cfg.lora else "all weights")
    lines = [f"# Fine-tune of {Path(str(model.path)).name}", "",
             f"Supervised fine-tuning with `unmask finetune` on `{data}`: {s['train_examples']} examples, "
             f"{s['steps']} steps of {cfg.batch_size}, learning rate {cfg.learning_rate:g} (warmup, cosine), "
             f"{how}; {s['seconds']:.0f} s.", "",
             f"Base model: `{model.path}` ({model.config.objective}, {model.config.attention} attention).", ""]
    if s["held_out_loss_before"] is not None:
        lines += [f"Held-out loss ({s['held_out_examples']} examples, nats per answer token, fixed noise): "
                  f"{s['held_out_loss_before']:.4f} before, {s['held_out_loss_after']:.4f} after.", ""]
    lines += ["The full recipe is in `finetune.json`."]
    return "\n".join(lines) + "\n"
