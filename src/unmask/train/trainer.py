"""The training loop: AdamW with warmup + cosine decay, clipping, accumulation, periodic held-out
bits per byte, JSONL log, atomic checkpoints and exact resume (on any number of ranks), single
process or under torchrun with DDP or FSDP2 (train/parallel.py)."""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..config import ModelConfig, TrainConfig, atomic_write_text, load_train_config
from ..diffusion import compute_loss, get_schedule
from ..errors import UserError
from ..eval.bpb import bits_per_byte
from ..model import Transformer
from . import distributed, parallel
from .batches import FimSpec, global_batch
from .checkpoint import latest_checkpoint, load_checkpoint, load_full_checkpoint, save_full_checkpoint
from .ema import EMA
from .flops import flops_per_token, peak_flops


def lr_at(step: int, cfg: TrainConfig) -> float:
    o, total = cfg.optim, cfg.train.max_steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.schedule == "wsd":
        decay = max(1, round(o.decay_frac * total))
        start = max(o.warmup_steps, total - decay)
        if step < start:
            return o.lr
        progress = min(1.0, (step - start) / max(1, total - start))
    else:
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(net: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    # Norm gains are not decayed: shrinking them only fights the normalisation.
    decay = [p for n, p in net.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.dim() < 2]
    o = cfg.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=(o.beta1, o.beta2), foreach=True,
    )


def model_config(cfg: TrainConfig, tok) -> ModelConfig:
    return ModelConfig(**cfg.model.model_dump(), vocab_size=tok.vocab_size, mask_token_id=tok.mask_id,
                       eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def fim_spec(cfg: TrainConfig, tok) -> FimSpec:
    line_starts = None
    if cfg.data.fim_rate > 0 and cfg.data.fim_line_rate > 0:
        line_starts = np.array([t.startswith("\n") for t in tok.token_texts()], dtype=bool)
    return FimSpec(tok.fim_prefix_id, tok.fim_suffix_id, tok.fim_middle_id,
                   end_id=tok.eos_id if cfg.data.fim_end else None, line_starts=line_starts,
                   line_rate=cfg.data.fim_line_rate, max_lines=cfg.data.fim_max_lines, layout=cfg.data.fim_layout)


def init_weights(net: Transformer, path: Path, config, tok) -> None:
    """Copy a saved model's weights into `net` (a fine-tune's start), in full precision."""
    from ..pretrained import load

    src = load(path)
    if not tok.same_as(src.tokenizer):
        raise UserError(f"{config}: train.init_from={path} has a different tokenizer from the corpus's; "
                        "fine-tune on a corpus built with that model's tokenizer.json")
    mine, theirs = net.config.model_dump(), src.config.model_dump()
    diff = sorted(k for k in mine if mine[k] != theirs.get(k))
    if diff:
        k = diff[0]
        raise UserError(f"{config}: train.init_from={path} has {k}={theirs.get(k)!r} but [model] gives "
                        f"{mine[k]!r}; make [model] match the model you fine-tune")
    with torch.no_grad():
        net.load_state_dict({k: v.float() for k, v in src.net.state_dict().items()})


def _split_sizes(cfg: TrainConfig, world: int) -> tuple[int, int]:
    b = cfg.train.batch_size
    micro = cfg.train.micro_batch_size or b // world
    if micro <= 0 or b % (micro * world):
        raise UserError(f"train.batch_size={b} must be a multiple of micro_batch_size={micro} x world size {world}")
    return micro, b // (micro * world)


def train(config: str | Path, out: str | Path, max_steps: int | None = None, resume: bool = False,
          time_limit: float | None = None, parallel_mode: str | None = None) -> Path:
    """Train from a config. With `time_limit` (seconds of this process), the run stops cleanly after
    the first step past the limit: a checkpoint for --resume and, in `out/partial`, an export of the
    weights so far (the EMA when there is one: it stands in for the learning-rate decay not yet run).
    Returns the export's directory."""
    from ..data import corpus_meta, load_split
    from ..tokenizer import Tokenizer

    t_start = time.perf_counter()
    cfg = load_train_config(config)
    if max_steps is not None:
        cfg.train.max_steps = max_steps
    if parallel_mode is not None:
        cfg.train.parallel = parallel_mode
    out = Path(out)
    ckpt_root = out / "checkpoints"
    if not resume and latest_checkpoint(ckpt_root) is not None:
        raise UserError(f"{out}: already holds checkpoints; pass --resume to continue or choose another --out")
    d = distributed.init()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    corpus = Path(cfg.data.dir)
    meta = corpus_meta(corpus)
    train_tokens, val_tokens = load_split(corpus, "train"), load_split(corpus, "val")
    if cfg.data.train_tokens:
        if cfg.data.train_tokens > len(train_tokens):
            raise UserError(f"{config}: data.train_tokens={cfg.data.train_tokens} but {corpus} has only "
                            f"{len(train_tokens)} train tokens; lower it or rebuild the corpus")
        train_tokens = train_tokens[: cfg.data.train_tokens]
    tok = Tokenizer.from_file(corpus / "tokenizer.json")
    mcfg = model_config(cfg, tok)
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise UserError(f"{config}: data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    if mcfg.objective == "bd3lm" and cfg.data.seq_len % mcfg.block_size:
        raise UserError(f"{config}: data.seq_len must be a multiple of model.block_size={mcfg.block_size}")
    micro, accum = _split_sizes(cfg, d.world)

    fim = fim_spec(cfg, tok)
    mode = parallel.resolve(cfg.train.parallel, d.world)
    if mode == "fsdp" and cfg.train.ema:
        raise UserError(f"{config}: train.ema does not combine with FSDP (the average would need its own "
                        "sharding); use --parallel ddp, or set train.ema = 0")
    torch.manual_seed(cfg.train.seed)
    net = Transformer(mcfg).to(d.device)
    ck = latest_checkpoint(ckpt_root) if resume else None
    if cfg.train.init_from and ck is None:  # a resumed fine-tune continues from its checkpoint
        init_weights(net, Path(cfg.train.init_from), config, tok)
    # DDP or FSDP2 applied from outside the model (train/parallel.py); `net` stays the module whose
    # parameters the optimizer steps (FSDP shards them in place)
    model = parallel.parallelize(net, mode, d.world, d.device, cfg.train.activation_checkpointing)
    opt = make_optimizer(net, cfg)
    ema = EMA(net, cfg.train.ema) if cfg.train.ema > 0 else None
    start = _restore(ck, net, opt, ema) if ck is not None else 0
    if cfg.train.compile:
        model = torch.compile(model)
    sharded = parallel.is_sharded(net)
    schedule = get_schedule(cfg.diffusion.schedule)
    bpt = meta["splits"]["val"]["bytes"] / meta["splits"]["val"]["tokens"]
    log_path = out / "log.jsonl"
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(cfg.model_dump(), indent=2))
        _truncate_log(log_path, start)
    bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and d.device.type == "cuda")
    bf16 = bf16 and not (sharded and d.device.type == "cuda")  # FSDP's own bf16 mixed-precision policy instead
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    # matmul parameters: the body and the output head; input lookups (embeddings) cost no FLOPs
    fpt = flops_per_token(mcfg, net.num_params(non_embedding=True) + net.lm_head.weight.numel(), cfg.data.seq_len)
    peak = peak_flops(d.device, cfg.train.peak_tflops)
    evaluate = lambda: bits_per_byte(net, val_tokens, bpt, seq_len=cfg.data.seq_len, batch=micro,  # noqa: E731
                                     n_batches=cfg.train.eval_batches, seed=cfg.train.seed,
                                     schedule=cfg.diffusion.schedule, eps=cfg.diffusion.eps, device=d.device)
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not d.main, desc="train", dynamic_ncols=True)
    t_last, tokens_since = time.perf_counter(), 0
    record = None
    for step in range(start, cfg.train.max_steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        x0, noise = global_batch(train_tokens, cfg.data.seq_len, cfg.train.batch_size, cfg.train.seed, step,
                                 mcfg.objective, mcfg.block_size, cfg.diffusion.eps, cfg.diffusion.antithetic,
                                 cfg.data.fim_rate, fim)
        loss_sum = torch.zeros((), device=d.device)
        for a in range(accum):
            lo = (d.rank * accum + a) * micro
            sl = slice(lo, lo + micro)
            sync = a == accum - 1 or d.world == 1
            with parallel.sync_gradients(model, sync), autocast:
                res = compute_loss(mcfg.objective, model, x0[sl].to(d.device),
                                   None if noise is None else noise[sl].to(d.device),
                                   schedule, mcfg.mask_token_id, mcfg.block_size,
                                   estimator=cfg.diffusion.estimator, eps=cfg.diffusion.eps)
            (res.loss / accum).backward()
            loss_sum += res.loss.detach() / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(net, step)
        loss = float(d.mean(loss_sum))
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {step}; lower optim.lr or check the data")
        done = step + 1
        tokens_since += tokens_per_step
        bar.update(1)
        record = None
        if done % cfg.train.log_interval == 0 or done == cfg.train.max_steps:
            now = time.perf_counter()
            tps = tokens_since / (now - t_last)
            record = {"step": done, "loss": loss, "lr": lr, "grad_norm": parallel.scalar(grad_norm),
                      "tokens": done * tokens_per_step, "tok_per_s": tps, "flops_per_token": fpt,
                      "achieved_tflops": tps * fpt / 1e12}
            if peak:
                record["mfu"] = tps * fpt / peak
            t_last, tokens_since = now, 0
            bar.set_postfix(loss=f"{loss:.3f}")
        if done % cfg.train.eval_interval == 0 or done == cfg.train.max_steps:
            ev = evaluate() if sharded else None  # every rank takes part in a sharded forward
            if d.main:
                ev = ev or evaluate()
                record = {**(record or {"step": done}), "eval_bpb": ev["bpb"], "eval_nats_per_token": ev["nats_per_token"]}
                msg = f"step {done}: held-out {ev['bpb']:.4f} bits/byte"
                if ema is not None:
                    with ema.swapped_in(net):
                        record["eval_bpb_ema"] = evaluate()["bpb"]
                    msg += f" (EMA {record['eval_bpb_ema']:.4f})"
                bar.write(msg)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            d.barrier()
        if record and d.main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        out_of_time = time_limit is not None and d.any_true(time.perf_counter() - t_start > time_limit)
        if done % cfg.train.ckpt_interval == 0 or done == cfg.train.max_steps or out_of_time:
            _save(ckpt_root, done, net, opt, ema, {"tokens": done * tokens_per_step, "world": d.world}, d)
        if out_of_time and done < cfg.train.max_steps:
            bar.close()
            plain = parallel.gather_model(net, lambda: Transformer(mcfg), d.main)
            if d.main:
                _export(plain, tok, cfg, out / "partial", ema)
                bar.write(f"time limit: stopped after step {done} of {cfg.train.max_steps}; "
                          f"continue with --resume (partial export in {out / 'partial'})")
            model = net = plain = None  # noqa: F841  (the wrappers go before the process group)
            distributed.leave()
            return out / "partial"
    bar.close()
    plain = parallel.gather_model(net, lambda: Transformer(mcfg), d.main)
    if d.main:
        net = plain
        # Ship the average only when it measures better on held-out code.
        better = ema is not None and record and record.get("eval_bpb_ema", float("inf")) < record.get("eval_bpb", 0)
        _export(net, tok, cfg, out / "final", ema if better else None)
        if better:
            bar.write("exported the EMA weights (lower held-out bits/byte)")
    model = net = plain = None  # noqa: F841
    distributed.leave()
    return out / "final"


def _save(root: Path, step: int, net, opt, ema, extra: dict, d) -> None:
    """A checkpoint of the full state (train/parallel.py: gathered from every rank, written by the
    main one), so a run resumes on any number of ranks, with or without FSDP."""
    model_state, optim = parallel.full_state(net, opt)
    if d.main:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        save_full_checkpoint(root, step, model_state, optim, groups, extra,
                             ema_state=None if ema is None else ema.state_dict())
    d.barrier()


def _restore(ck: Path, net, opt, ema) -> int:
    """Load checkpoint `ck` into the (possibly sharded) model, optimizer and EMA; the step it was at."""
    from safetensors.torch import load_file

    if "optimizer" in json.loads((ck / "trainer.json").read_text()):  # the parameter-id format of earlier versions
        if parallel.is_sharded(net):
            raise UserError(f"{ck}: a checkpoint of an earlier unmask (optimizer state by parameter id), which "
                            "FSDP cannot load; resume it on one process or with --parallel ddp")
        return load_checkpoint(ck, net, opt, ema)["step"]
    model_state, optim, meta = load_full_checkpoint(ck)
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in model_state.items()}
    extra = sorted(set(got) - set(want))
    bad = sorted(k for k in want if k != "lm_head.weight" and got.get(k) != want[k])
    if extra or bad:
        k = (bad or extra)[0]
        raise UserError(f"{ck}: checkpoint does not match the model in the config ({k}: {got.get(k)} in the "
                        f"checkpoint, {want.get(k)} in the config); resume with the config it was trained with")
    parallel.load_full_state(net, opt, model_state, optim, meta["param_groups"])
    if ema is not None:
        if not (ck / "ema.safetensors").exists():
            raise UserError(f"{ck}: has no EMA state but the config sets train.ema; resume with the config it "
                            "was trained with")
        ema.load_state_dict(load_file(ck / "ema.safetensors"))
    return meta["step"]


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines the killed run wrote after its last checkpoint."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _export(net: Transformer, tok, cfg: TrainConfig, out: Path, ema: EMA | None = None) -> None:
    """Export the weights, or the EMA's when one is given."""
    from ..pretrained import save

    gen = cfg.generation.model_copy(update={"fim_layout": cfg.data.fim_layout})
    if net.config.attention == "block":
        gen = gen.model_copy(update={"block_size": net.config.block_size})
    with ema.swapped_in(net) if ema is not None else contextlib.nullcontext():
        save(net, out, tokenizer=tok, generation=gen, dtype=torch.float32)
