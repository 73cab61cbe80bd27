"""`unmask` command line. User errors print one line and exit 2; bugs exit 1 with a traceback."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import UserError


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def cmd_data_build(a) -> None:
    from .data import build_corpus

    m = build_corpus(a.manifest, Path(a.out), cache=a.cache, max_mb=a.max_mb, vocab_size=a.vocab_size,
                     tokenizer=a.tokenizer, find_links=a.find_links)
    s = m["splits"]
    print(f"corpus written to {a.out}: train {s['train']['tokens']:,} tokens ({s['train']['bytes'] / 1e6:.1f} MB), "
          f"val {s['val']['tokens']:,} tokens ({s['val']['bytes'] / 1e6:.1f} MB)")


def cmd_tokenizer_train(a) -> None:
    from .tokenizer import train_from_corpus

    train_from_corpus(Path(a.corpus), Path(a.out), vocab_size=a.vocab_size)
    print(f"tokenizer written to {Path(a.out) / 'tokenizer.json'}")


def cmd_train(a) -> None:
    from .train import train

    final = train(a.config, a.out, max_steps=a.max_steps, resume=a.resume)
    print(f"model written to {final}")


def cmd_generate(a) -> None:
    from .pretrained import load

    model = load(a.model)
    prompt = a.prompt if a.prompt != "-" else sys.stdin.read()
    if a.reference:
        from .sampling import reference_generate

        out = reference_generate(model, prompt, max_tokens=a.max_tokens, steps=a.steps, block_size=a.block_size,
                                 temperature=a.temperature, top_p=a.top_p, policy=a.policy, suffix=a.suffix,
                                 seed=a.seed)
        stats = dict(text=out.text, completion_tokens=out.completion_tokens, nfe=out.nfe, seconds=out.seconds,
                     finish_reason=out.finish_reason)
    else:
        from .engine import Engine, SamplingParams

        engine = Engine(model, max_batch=1, quantize=a.quantize, cache=a.cache)
        params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, policy=a.policy,
                                threshold=a.threshold, steps=a.steps, block_size=a.block_size, seed=a.seed,
                                suffix=a.suffix, stop=a.stop)
        out = engine.generate([prompt], params)[0]
        stats = dict(text=out.text, completion_tokens=out.completion_tokens, nfe=out.nfe, seconds=out.seconds,
                     finish_reason=out.finish_reason, ttft=out.ttft)
    stats["tokens_per_forward"] = stats["completion_tokens"] / max(stats["nfe"], 1)
    stats["tokens_per_second"] = stats["completion_tokens"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    if a.json:
        print(json.dumps(stats))
        return
    print(prompt + stats["text"] + (a.suffix or ""))
    print(f"\n[{stats['completion_tokens']} tokens, NFE {stats['nfe']}, TPF {stats['tokens_per_forward']:.2f}, "
          f"{stats['tokens_per_second']:.1f} tok/s, {stats['seconds']:.2f} s, finish={stats['finish_reason']}]",
          file=sys.stderr)


def cmd_eval_bpb(a) -> None:
    from .data import corpus_meta, load_split
    from .eval import bits_per_byte
    from .pretrained import load

    model = load(a.model)
    meta = corpus_meta(Path(a.corpus))
    split = meta["splits"][a.split]
    t0 = time.perf_counter()
    res = bits_per_byte(model.net, load_split(Path(a.corpus), a.split), split["bytes"] / split["tokens"],
                        seq_len=a.seq_len, batch=a.batch, n_batches=a.batches, seed=a.seed)
    res.update(model=str(model.path), objective=model.config.objective, split=a.split, seconds=time.perf_counter() - t0)
    print(json.dumps(res) if a.json else f"{res['bpb']:.4f} bits/byte ({model.config.objective}, {res['tokens']} tokens)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unmask", description="Train, fine-tune and serve masked-diffusion LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="code corpus").add_subparsers(dest="data_command", required=True)
    b = data.add_parser("build", help="download, license-filter, dedup, split and tokenize the code corpus")
    b.add_argument("--manifest", type=Path, default=None, help="pinned corpus manifest (default: configs/corpus/default.toml)")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--cache", type=Path, default=None, help="where downloaded packages are kept")
    b.add_argument("--max-mb", type=float, default=None, help="cap on total source size in MB")
    b.add_argument("--vocab-size", type=_positive_int, default=None)
    b.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json instead of training one")
    b.add_argument("--find-links", type=Path, default=None, help="install packages from this local directory only")
    b.set_defaults(func=cmd_data_build)

    tk = sub.add_parser("tokenizer", help="tokenizer").add_subparsers(dest="tok_command", required=True)
    t = tk.add_parser("train", help="train the byte-level BPE on a built corpus")
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=_positive_int, default=8192)
    t.set_defaults(func=cmd_tokenizer_train)

    tr = sub.add_parser("train", help="pretrain a model from a config under configs/")
    tr.add_argument("config")
    tr.add_argument("--out", required=True)
    tr.add_argument("--max-steps", type=_positive_int, default=None)
    tr.add_argument("--resume", action="store_true", help="continue exactly from the latest checkpoint in --out")
    tr.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="one completion")
    g.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    g.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    g.add_argument("--max-tokens", type=_positive_int, default=None)
    g.add_argument("--policy", default=None)
    g.add_argument("--threshold", type=float, default=None)
    g.add_argument("--steps", type=_positive_int, default=None)
    g.add_argument("--block-size", type=_positive_int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--suffix", default=None, help="text after the gap: fill in the middle")
    g.add_argument("--quantize", choices=["int8", "bf16"], default=None, help="quantize weights for serving")
    g.add_argument("--cache", default="auto", help="KV cache: auto, exact, prefix, dual or none")
    g.add_argument("--reference", action="store_true", help="use the slow reference sampler instead of the engine")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="quality evaluations").add_subparsers(dest="eval_command", required=True)
    e = ev.add_parser("bpb", help="held-out bits per byte (ELBO for diffusion models, exact NLL for AR)")
    e.add_argument("--model", default=None)
    e.add_argument("--corpus", required=True)
    e.add_argument("--split", default="val", choices=["train", "val"])
    e.add_argument("--seq-len", type=_positive_int, default=256)
    e.add_argument("--batch", type=_positive_int, default=8)
    e.add_argument("--batches", type=_positive_int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval_bpb)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as e:
        print(f"unmask: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
