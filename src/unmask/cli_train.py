"""`unmask train`, `unmask finetune` and `unmask distill`: the commands that change weights. Kept apart
from cli.py's serving and evaluation commands; like them, nothing heavy is imported before a command runs."""
from __future__ import annotations

import argparse
import json


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


_positive_int = positive_int


def cmd_train(a) -> None:
    from .train import train

    final = train(a.config, a.out, max_steps=a.max_steps, resume=a.resume, time_limit=a.time_limit,
                  parallel_mode=a.parallel)
    print(f"model written to {final}")


def cmd_finetune(a) -> None:
    from .config import FinetuneConfig, parse
    from .server.launch import pick_device
    from .train.finetune import finetune

    fields = dict(epochs=a.epochs, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, lora=a.lora,
                  lora_rank=a.lora_rank, lora_alpha=a.lora_alpha, val_frac=a.val_frac, seed=a.seed,
                  threads=a.threads, skip_long=a.skip_long or None, ckpt_interval=a.ckpt_interval,
                  parallel=a.parallel, activation_checkpointing=a.activation_checkpointing or None,
                  noise_samples=a.noise_samples, rotate_noise=a.rotate_noise)
    cfg = parse(FinetuneConfig, {k: v for k, v in fields.items() if v is not None}, "unmask finetune")
    summary = finetune(a.model, a.data, a.out, cfg, device=pick_device(a.device),
                       log=(lambda *_: None) if a.json else print, resume=a.resume, time_limit=a.time_limit,
                       save_adapter=a.save_adapter)
    if summary.get("rank", 0) != 0:  # rank 0 reports for every rank
        return
    if a.json:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "config")}))


def cmd_distill(a) -> None:
    from .config import DistillConfig, parse
    from .server.launch import pick_device
    from .train.distill import distill

    fields = dict(prompts=a.prompts, fim_frac=a.fim_frac, max_tokens=a.max_tokens, certainty=a.certainty,
                  epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, lora=a.lora, lora_rank=a.lora_rank,
                  val_frac=a.val_frac, seed=a.seed, threads=a.threads, concurrency=a.concurrency,
                  block_size=a.block_size)
    cfg = parse(DistillConfig, {k: v for k, v in fields.items() if v is not None}, "unmask distill")
    summary = distill(a.model, a.out, cfg, corpus=a.corpus, trajectories=a.trajectories,
                      device=pick_device(a.device), log=(lambda *_: None) if a.json else print)
    if a.json:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("history", "config", "held_out_prompts")}))


def cmd_commit_rule(a) -> None:
    from .config import DistillConfig, parse
    from .server.launch import pick_device
    from .train.commit_rule import train_commit_rule

    fields = dict(prompts=a.prompts, fim_frac=a.fim_frac, max_tokens=a.max_tokens, seed=a.seed, threads=a.threads)
    cfg = parse(DistillConfig, {k: v for k, v in fields.items() if v is not None}, "unmask commit-rule")
    info = train_commit_rule(a.model, cfg, corpus=a.corpus, trajectories=a.trajectories, draws=a.draws,
                             device=pick_device(a.device), log=(lambda *_: None) if a.json else print)
    if a.json:
        print(json.dumps(info))


def _teacher_args(p, trajectories: str) -> None:
    """The options of commands that decode corpus prompts with the model (distill, commit-rule)."""
    p.add_argument("--corpus", default=None, help="a built corpus (unmask data build); prompts come from its train "
                                                  "split (default: corpus/default, when built)")
    p.add_argument("--trajectories", default=None, help=trajectories)
    p.add_argument("--prompts", type=positive_int, default=None, help="prompts to decode (default 512)")
    p.add_argument("--fim-frac", type=float, default=None, help="share of fill-in-the-middle prompts (default 0.25)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="tokens per decoding (default 64)")


def _run_args(p) -> None:
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    p.add_argument("--json", action="store_true", help="print one JSON summary instead of progress")


def add_training_commands(sub) -> None:
    tr = sub.add_parser("train", help="pretrain a model from a config under configs/")
    tr.add_argument("config")
    tr.add_argument("--out", required=True)
    tr.add_argument("--max-steps", type=_positive_int, default=None)
    tr.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in --out")
    tr.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="stop cleanly after this many seconds: checkpoint + export to OUT/partial; "
                         "continue with --resume")
    tr.add_argument("--parallel", choices=("auto", "ddp", "fsdp"), default=None,
                    help="under torchrun: ddp (replicas) or fsdp (FSDP2 sharding); default: the config's "
                         "train.parallel (auto: ddp with several ranks)")
    tr.set_defaults(func=cmd_train)

    ft = sub.add_parser("finetune", help="supervised fine-tuning (all weights, or LoRA) on a JSONL of examples",
                        description="Each line of --data is one JSON object: {prompt, completion}, {messages} "
                                    "(ending in the assistant's answer), {prefix, suffix, middle} (fill in the "
                                    "middle) or {text}. The prompt is kept clean and only the answer is learned.")
    ft.add_argument("--model", default=None, help="model directory to start from (default: the embedded model)")
    ft.add_argument("--data", required=True, help="JSONL file of examples")
    ft.add_argument("--out", required=True, help="where to write the fine-tuned model (a new directory)")
    ft.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the saved weights)")
    ft.add_argument("--save-adapter", action="store_true",
                    help="with --lora: also write the adapters alone to OUT/adapter (load them onto the same "
                         "base with --adapter)")
    ft.add_argument("--lora-rank", type=_positive_int, default=None, help="adapter rank (default 64)")
    ft.add_argument("--lora-alpha", type=float, default=None, help="adapter scale numerator (default 128)")
    ft.add_argument("--epochs", type=float, default=None, help="passes over the examples (default 3)")
    ft.add_argument("--batch-size", type=_positive_int, default=None, help="examples per step (default 4)")
    ft.add_argument("--lr", type=float, default=None, help="peak learning rate (default: by the model's size, "
                                                           "2e-3 at 28M parameters to 2.5e-5 at 8B; LoRA 2e-3 to 2e-4)")
    ft.add_argument("--seq-len", type=_positive_int, default=None, help="longest example (default: the context)")
    ft.add_argument("--skip-long", action="store_true", help="leave out examples over --seq-len instead of stopping")
    ft.add_argument("--val-frac", type=float, default=None, help="share held out to measure the loss (default 0.1)")
    ft.add_argument("--seed", type=int, default=None)
    ft.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    ft.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    ft.add_argument("--json", action="store_true", help="print one JSON summary instead of progress")
    ft.add_argument("--ckpt-interval", type=_positive_int, default=None,
                    help="steps between checkpoints (default: a tenth of the run, at least 25)")
    ft.add_argument("--resume", action="store_true", help="continue the interrupted fine-tune in --out exactly")
    ft.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                    help="stop cleanly after the first step past this many seconds of training, with a checkpoint")
    ft.add_argument("--parallel", choices=("auto", "none", "ddp", "fsdp"), default=None,
                    help="under torchrun: ddp (replicas) or fsdp (FSDP2 sharding); auto (default): ddp with several ranks")
    ft.add_argument("--noise-samples", type=_positive_int, default=None,
                    help="diffusion models: noise each example this many times per step (default 4)")
    ft.add_argument("--rotate-noise", action=argparse.BooleanOptionalAction, default=None,
                    help="with --noise-samples > 1: spread the copies over mask levels and rotate one draw of token "
                         "uniforms through them, so each answer token is masked in a spread of them (default on)")
    ft.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute block activations in the backward pass (less memory, more compute)")
    ft.set_defaults(func=cmd_finetune)

    d = sub.add_parser("distill", help="make a diffusion model commit more tokens per forward: its own careful "
                                       "decodings of corpus prompts, then a certainty-forcing fine-tune",
                       description="Decodes prompts cut from the corpus's train split one token per forward (the "
                                   "teacher), then fine-tunes the model to predict those tokens with confidence "
                                   "from partly masked blocks. Writes the model, trajectories.jsonl and distill.json "
                                   "(held-out tokens per forward and agreement with the teacher, before and after).")
    d.add_argument("--model", default=None, help="model directory to start from (default: the embedded model)")
    d.add_argument("--out", required=True, help="where to write the distilled model (a new directory)")
    _teacher_args(d, trajectories="reuse a trajectories.jsonl of an earlier run (no --corpus needed)")
    d.add_argument("--certainty", type=float, default=None,
                   help="weight of the entropy term where the model is right (default 1; 0: plain self-distillation)")
    d.add_argument("--block-size", type=positive_int, default=None,
                   help="block models: learn to decode blocks of this size (the teacher keeps the model's)")
    d.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the saved weights)")
    d.add_argument("--lora-rank", type=positive_int, default=None, help="adapter rank (default 8)")
    d.add_argument("--epochs", type=float, default=None, help="passes over the trajectories (default 2)")
    d.add_argument("--batch-size", type=positive_int, default=None, help="trajectories per step (default 8)")
    d.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3 LoRA, 5e-5 full)")
    d.add_argument("--val-frac", type=float, default=None, help="share held out for the before/after check (default 0.05)")
    d.add_argument("--concurrency", type=positive_int, default=None, help="teacher requests in flight (default 16)")
    _run_args(d)
    d.set_defaults(func=cmd_distill)

    r = sub.add_parser("commit-rule", help="train the learned decoding policy's classifier for a model (stored "
                                           "beside its weights; use it with --policy learned)",
                       description="Learns, from the model's own careful decodings of corpus prompts, which "
                                   "proposals of a partly decoded block are final, from each position's "
                                   "confidence, margin, entropy and neighbours. Writes commit_rule.safetensors and "
                                   "commit_rule.json into the model directory.")
    r.add_argument("--model", required=True, help="model directory (the rule is written into it)")
    _teacher_args(r, trajectories="a trajectories.jsonl of this same model (e.g. from unmask distill of it) instead "
                                  "of --corpus")
    r.add_argument("--draws", type=positive_int, default=4, help="masked states drawn per trajectory (default 4)")
    _run_args(r)
    r.set_defaults(func=cmd_commit_rule)
