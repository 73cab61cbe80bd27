"""`unmask` command line. User errors print one line and exit 2; bugs exit 1 with a traceback."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .cli_data import add_data_commands
from .cli_train import add_training_commands, positive_int as _positive_int
from .errors import UserError
from .structured.cli import add_arguments as structured_arguments

# engine/quantize.py's MODES, spelled out so that `unmask --help` does not import torch (a test keeps
# the two equal).
QUANT_MODES = ("int8", "int8wo", "bf16")
LLAMA_WEIGHTS = ("f32", "f16", "q8_0")  # engine/core.py's LLAMA_WEIGHTS: the llama.cpp backend's weights
QUANT_HELP = ("quantize weights: int8wo (int8 weights, fastest on CPUs without int8 dot products), "
              "int8 (int8 weights and activations, for VNNI/AMX CPUs), bf16 (CUDA); with --backend llama.cpp: "
              "f32 (default), f16 or q8_0")
BACKEND_HELP = ("what runs the forward: torch (default), or llama.cpp (CPU; block-causal and causal models; needs "
                "the llama-cpp-python package, which `make venv` installs)")
FALLBACK_HELP = ("what a step commits when the policy picks no position (not topk): the one it ranks first (best) "
                 "or the leftmost masked one (leftmost); default: the model's")
LOOKAHEAD_HELP = ("block models: do not run the next block's first step on a guess in a block's last step "
                  "(the tokens are the same either way; lookahead only saves forwards)")


def cmd_generate(a) -> None:
    from .pretrained import load

    model = load(a.model, adapter=a.adapter)
    prompt = a.prompt if a.prompt != "-" else sys.stdin.read()
    if a.reference:
        if a.json_schema is not None or a.json_object or a.regex is not None or a.choice or a.grammar is not None:
            raise UserError("structured output (--json-schema, --regex, ...) runs on the engine; drop --reference")
        if a.template is not None:
            raise UserError("--template runs on the engine; drop --reference")
        if a.fallback is not None:
            raise UserError("--fallback applies to the engine's policies; drop --reference or --fallback")
        if not a.lookahead:
            raise UserError("--no-lookahead applies to the engine; drop --reference or --no-lookahead")
        from .frontend.healing import ASCII_WHITESPACE, split_trailing_whitespace, unheal
        from .sampling import reference_generate

        # The reference sampler knows no constraints: it is healed as the evaluations heal it (the
        # whitespace goes, the model rewrites it unconstrained, the text is taken relative to the prompt).
        sent, ws = split_trailing_whitespace(prompt, ASCII_WHITESPACE) if a.heal else (prompt, "")
        out = reference_generate(model, sent, max_tokens=a.max_tokens, steps=a.steps, block_size=a.block_size,
                                 temperature=a.temperature, top_p=a.top_p, policy=a.policy, suffix=a.suffix,
                                 seed=a.seed)
        stats = dict(text=unheal(out.text, ws), completion_tokens=out.completion_tokens, nfe=out.nfe,
                     seconds=out.seconds, finish_reason=out.finish_reason)
    else:
        from .engine import Engine, SamplingParams

        from .frontend.template import load_template
        from .structured.cli import from_args

        engine = Engine(model, max_batch=1, quantize=a.quantize, cache=a.cache, lookahead=a.lookahead,
                        backend=a.backend)
        params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, policy=a.policy,
                                threshold=a.threshold, fallback=a.fallback, steps=a.steps, block_size=a.block_size,
                                seed=a.seed, suffix=a.suffix, stop=a.stop, heal=a.heal, response_format=from_args(a),
                                template=None if a.template is None else load_template(a.template))
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


ADAPTER_HELP = ("a LoRA adapter directory (unmask finetune --lora --save-adapter: OUT/adapter) merged into --model "
                "at load; refused when it was trained on another base")


def cmd_serve(a) -> None:
    from .server import ServerConfig, serve

    if a.api_key == "":
        raise UserError("--api-key is empty; pass a key or leave the option out")
    if not 0 <= a.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {a.port}")
    if a.max_queue < 0 or not a.timeout > 0:
        raise UserError("--max-queue must be >= 0 and --timeout > 0")
    cfg = ServerConfig(api_key=a.api_key, max_batch=a.max_batch, max_queue=a.max_queue, request_timeout=a.timeout,
                       max_body_bytes=a.max_body_bytes, max_tokens_limit=a.max_tokens_limit)
    if a.tensor_parallel > 1 and "WORLD_SIZE" not in os.environ:
        from .engine.tensor_parallel import precheck

        from .server.launch import spawn_ranks

        if a.quantize or a.backend != "torch":
            raise UserError(f"--tensor-parallel runs the plain torch forward: drop --{'quantize' if a.quantize else 'backend'}")
        precheck(a.model, a.tensor_parallel)  # a world size that does not divide the heads: one line, exit 2
        # not under torchrun: start the ranks ourselves, on this machine, and wait for them
        raise SystemExit(spawn_ranks(a.tensor_parallel, [sys.executable, "-m", "unmask", *sys.argv[1:]]))
    serve(a.model, a.host, a.port, cfg=cfg,
          engine_options=dict(quantize=a.quantize, cache=a.cache, lookahead=a.lookahead, backend=a.backend),
          device=a.device, tensor_parallel=a.tensor_parallel, adapter=a.adapter)


def cmd_eval_bpb(a) -> None:
    from .data import corpus_meta, load_split
    from .eval import bits_per_byte
    from .pretrained import load

    model = load(a.model)
    if a.quantize:
        from .engine.quantize import quantize_model
        model = quantize_model(model, a.quantize)
    meta = corpus_meta(Path(a.corpus))
    split = meta["splits"][a.split]
    t0 = time.perf_counter()
    res = bits_per_byte(model.net, load_split(Path(a.corpus), a.split), split["bytes"] / split["tokens"],
                        seq_len=a.seq_len, batch=a.batch, n_batches=a.batches, seed=a.seed)
    res.update(model=str(model.path), objective=model.config.objective, split=a.split, quantize=a.quantize,
               seconds=time.perf_counter() - t0)
    print(json.dumps(res) if a.json else f"{res['bpb']:.4f} bits/byte ({model.config.objective}, {res['tokens']} tokens)")


def _eval_params(a) -> dict:
    if a.steps is not None and a.policy not in (None, "topk"):
        raise UserError("--steps applies to the topk policy only")
    if not a.timeout > 0:
        raise UserError(f"--timeout must be a positive number of seconds, got {a.timeout}")
    return dict(timeout=a.timeout, workers=a.workers)


def _eval_setup(a):
    from .eval import Decoding
    from .eval.generate import set_threads
    from .pretrained import load

    set_threads(a.threads)
    model = load(a.model)
    policy = "topk" if a.steps is not None else a.policy
    steps_ratio = a.steps / a.max_tokens if a.steps is not None else None  # topk steps, relative to max_tokens
    sampler = "reference" if a.reference else "engine"
    if a.quantize and a.reference:
        raise UserError("--quantize applies to the engine; drop --reference or --quantize")
    if a.fallback is not None and a.reference:
        raise UserError("--fallback applies to the engine's policies; drop --reference or --fallback")
    if not a.lookahead and a.reference:
        raise UserError("--no-lookahead applies to the engine; drop --reference or --no-lookahead")
    if a.backend != "torch" and a.reference:
        raise UserError("--backend applies to the engine; drop --reference or --backend")
    return model, Decoding(a.eval_command, sampler, policy, a.threshold, steps_ratio, quantize=a.quantize,
                           fallback=a.fallback, lookahead=a.lookahead, backend=a.backend)


def _eval_report(a, res: dict, summary: str, per_key: str) -> None:
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in res[per_key]))
    if a.json:
        print(json.dumps({k: v for k, v in res.items() if k != per_key}))
    else:
        print(summary)


def cmd_eval_humaneval(a) -> None:
    from .eval import evaluate_humaneval

    ex = _eval_params(a)
    model, dec = _eval_setup(a)
    res = evaluate_humaneval(model, dec, limit=a.limit, max_tokens=a.max_tokens, concurrency=a.batch, **ex)
    res["model"] = str(model.path)
    passed = sum(r["passed"] for r in res["problems"])
    _eval_report(a, res, f"HumanEval pass@1 {100 * res['pass_at_1']:.1f}% ({passed}/{res['n']}), syntax valid "
                 f"{100 * res['syntax_valid']:.1f}%, {res['tokens_per_second']:.1f} tok/s, TPF "
                 f"{res['tokens_per_forward']:.2f} [{res['decoding']}, {res['max_tokens']} tokens]", "problems")


def cmd_eval_infill(a) -> None:
    from .eval import evaluate_infill

    ex = _eval_params(a)
    model, dec = _eval_setup(a)
    res = evaluate_infill(model, dec, limit=a.limit, max_lines_per_problem=a.lines_per_problem,
                          max_tokens=a.max_tokens, concurrency=a.batch, **ex)
    res["model"] = str(model.path)
    _eval_report(a, res, f"single-line infilling: pass@1 {100 * res['pass_at_1']:.1f}%, exact match "
                 f"{100 * res['exact_match']:.1f}% ({res['n']} lines of {res['problems']} problems), "
                 f"{res['tokens_per_second']:.1f} tok/s [{res['decoding']}]", "cases")


def cmd_eval_lines(a) -> None:
    from .eval import evaluate_lines, load_heldout

    _eval_params(a)
    model, dec = _eval_setup(a)
    items = load_heldout(a.heldout, limit=a.limit)
    res, batch = evaluate_lines(model, dec, items=items, max_tokens=a.max_tokens, concurrency=a.batch)
    toks = sum(c.completion_tokens for c in batch.completions)
    res.update(model=str(model.path), decoding=dec.describe(), seconds=batch.wall_seconds,
               tokens_per_second=toks / batch.wall_seconds if batch.wall_seconds > 0 else 0.0)
    _eval_report(a, res, f"held-out line completion: exact match {100 * res['exact_match']:.1f}%, edit similarity "
                 f"{100 * res['edit_similarity']:.1f}% ({res['n']} lines) [{res['decoding']}]", "items")


def cmd_bench(a) -> None:
    from .bench import format_table, run_bench, workload, write_json, write_plot
    from .pretrained import DEFAULT_AR_MODEL, default_model_dir, load

    dllm = load(a.model)
    ar = load(a.ar_model if a.ar_model is not None else default_model_dir(DEFAULT_AR_MODEL))
    if dllm.config.attention == "causal":
        raise UserError(f"--model {dllm.path}: an autoregressive model; pass the diffusion model as --model "
                        "and its AR twin as --ar-model")
    if ar.config.attention != "causal":
        raise UserError(f"--ar-model {ar.path}: not an autoregressive (causal) model")
    if a.humaneval_limit is not None and a.humaneval_limit < 0:
        raise UserError(f"--humaneval-limit must be 0 (the timed prompts only) or more, got {a.humaneval_limit}")
    wl = workload(a.quick, length=a.length, prompts=a.prompts, lines=a.lines, humaneval_limit=a.humaneval_limit,
                  humaneval_concurrency=a.humaneval_batch)
    result = run_bench(dllm, ar, wl, heldout=a.heldout, threads=a.threads)
    json_path = write_json(result, a.json)
    plot_path = write_plot(result, a.plot if a.plot is not None else Path(a.json).with_suffix(".png"))
    print(format_table(result))
    print(f"\nwrote {json_path} and {plot_path}")


# Layouts `unmask convert --to` writes: unmask.families.supported(), spelled out so that `unmask --help`
# does not import torch (a test keeps the two equal).
CONVERT_TARGETS = ("unmask", "llama", "qwen2", "qwen3", "llada", "sdar", "Dream", "Fast_dLLM_Qwen", "llada2_moe")


def cmd_convert(a) -> None:
    from .convert import convert

    out = convert(a.src, a.dst, to=a.to, dtype=a.dtype, gguf_type=a.gguf_type)
    if str(a.dst).endswith(".gguf"):
        print(f"wrote {out} (GGUF, {a.gguf_type.upper()})")
    else:
        print(f"wrote {out} ({a.to} layout, dtype {a.dtype})")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="unmask", description="Train, fine-tune and serve masked-diffusion LMs.")
    sub = p.add_subparsers(dest="command", required=True)

    add_data_commands(sub)
    add_training_commands(sub)

    g = sub.add_parser("generate", help="one completion")
    g.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    g.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    g.add_argument("--max-tokens", type=_positive_int, default=None)
    g.add_argument("--policy", default=None, help="topk, threshold, factor, entropy, margin or learned (default: the model's)")
    g.add_argument("--threshold", type=float, default=None)
    g.add_argument("--fallback", default=None, help=FALLBACK_HELP)
    g.add_argument("--steps", type=_positive_int, default=None)
    g.add_argument("--block-size", type=_positive_int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--suffix", default=None, help="text after the gap: fill in the middle")
    g.add_argument("--template", default=None, metavar="FILE|TEXT",
                   help="a template with holes after the prompt: text with {{hole:N}} markers (N tokens each), "
                        "or a JSON list of strings and {\"hole\": N}; the model fills the holes (docs/templates.md)")
    g.add_argument("--no-heal", dest="heal", action="store_false",
                   help="send a prompt that ends in a newline (plus indentation) as it is; by default that "
                        "whitespace is taken off and the model rewrites it (prompt healing)")
    g.add_argument("--quantize", choices=QUANT_MODES + LLAMA_WEIGHTS, default=None, help=QUANT_HELP)
    g.add_argument("--backend", default="torch", choices=("torch", "llama.cpp"), help=BACKEND_HELP)
    g.add_argument("--cache", default="auto", help="KV cache: auto, exact, prefix, dual or none")
    g.add_argument("--no-lookahead", dest="lookahead", action="store_false", help=LOOKAHEAD_HELP)
    g.add_argument("--adapter", default=None, metavar="DIR", help=ADAPTER_HELP)
    g.add_argument("--reference", action="store_true", help="use the slow reference sampler instead of the engine")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    structured_arguments(g)
    g.set_defaults(func=cmd_generate)

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server, with the playground at /")
    sv.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", default=os.environ.get("UNMASK_API_KEY"),
                    help="require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $UNMASK_API_KEY)")
    sv.add_argument("--max-batch", type=_positive_int, default=16, help="requests decoded together")
    sv.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429")
    sv.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    sv.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20)
    sv.add_argument("--max-tokens-limit", type=_positive_int, default=None, help="cap on max_tokens (default: context)")
    sv.add_argument("--quantize", choices=QUANT_MODES + LLAMA_WEIGHTS, default=None, help=QUANT_HELP)
    sv.add_argument("--backend", default="torch", choices=("torch", "llama.cpp"), help=BACKEND_HELP)
    sv.add_argument("--cache", default="auto", help="KV cache: auto, exact, prefix, dual or none")
    sv.add_argument("--no-lookahead", dest="lookahead", action="store_false", help=LOOKAHEAD_HELP)
    sv.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    sv.add_argument("--adapter", default=None, metavar="DIR", help=ADAPTER_HELP)
    sv.add_argument("--tensor-parallel", type=_positive_int, default=1, metavar="N",
                    help="split each layer's heads and MLP over N ranks (N GPUs; a model too big for one): "
                         "under torchrun with N ranks, or unmask starts them on this machine")
    sv.set_defaults(func=cmd_serve)

    ev = sub.add_parser("eval", help="quality evaluations").add_subparsers(dest="eval_command", required=True)
    e = ev.add_parser("bpb", help="held-out bits per byte (ELBO for diffusion models, exact NLL for AR)")
    e.add_argument("--model", default=None)
    e.add_argument("--corpus", required=True)
    e.add_argument("--split", default="val", choices=["train", "val"])
    e.add_argument("--seq-len", type=_positive_int, default=256)
    e.add_argument("--batch", type=_positive_int, default=8)
    e.add_argument("--batches", type=_positive_int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--quantize", choices=QUANT_MODES, default=None,
                   help="quantize weights: int8wo, int8 or bf16 (PyTorch; this evaluation does not use the engine)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_eval_bpb)

    def decoding_args(q, max_tokens: int, batch: int) -> None:
        q.add_argument("--model", default=None, help="model directory (default: the embedded model)")
        q.add_argument("--limit", type=_positive_int, default=None, help="only the first N problems / items")
        q.add_argument("--max-tokens", type=_positive_int, default=max_tokens, help=f"generation length (default {max_tokens})")
        q.add_argument("--policy", default=None, help="topk, threshold, factor, entropy, margin, or learned (a commit rule stored with the model; unmask commit-rule) (default: the model's)")
        q.add_argument("--threshold", type=float, default=None, help="the policy's parameter (tau, factor or gamma)")
        q.add_argument("--fallback", default=None, help=FALLBACK_HELP)
        q.add_argument("--steps", type=_positive_int, default=None, help="topk: total diffusion steps")
        q.add_argument("--batch", type=_positive_int, default=batch, help=f"requests in flight (default {batch})")
        q.add_argument("--reference", action="store_true", help="use the slow reference sampler (one at a time)")
        q.add_argument("--quantize", choices=QUANT_MODES + LLAMA_WEIGHTS, default=None, help=QUANT_HELP)
        q.add_argument("--backend", default="torch", choices=("torch", "llama.cpp"), help=BACKEND_HELP)
        q.add_argument("--no-lookahead", dest="lookahead", action="store_false", help=LOOKAHEAD_HELP)
        q.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
        q.add_argument("--timeout", type=float, default=5.0, help="seconds per test program (default 5)")
        q.add_argument("--workers", type=_positive_int, default=2, help="test programs run in parallel (default 2)")
        q.add_argument("--json", action="store_true", help="print one JSON object (without per-item results)")
        q.add_argument("--out", default=None, help="write per-item results to this JSONL file")

    h = ev.add_parser("humaneval", help="HumanEval pass@1 (greedy, tests in sandboxed subprocesses) and syntax validity")
    decoding_args(h, 256, 16)
    h.set_defaults(func=cmd_eval_humaneval)
    f = ev.add_parser("infill", help="single-line infilling on HumanEval solutions: pass@1 and exact match")
    decoding_args(f, 48, 16)
    f.add_argument("--lines-per-problem", type=_positive_int, default=None,
                   help="mask this many lines per solution, spread (default: every non-blank line)")
    f.set_defaults(func=cmd_eval_infill)
    ln = ev.add_parser("lines", help="held-out line completion: exact match and edit similarity")
    decoding_args(ln, 32, 16)
    ln.add_argument("--heldout", default=None, help="JSONL of {prefix, line} (default: bench/heldout_lines.jsonl)")
    ln.set_defaults(func=cmd_eval_lines)

    bn = sub.add_parser("bench", help="speed and quality of the reference, the engine's policies and the AR twin")
    bn.add_argument("--model", default=None, help="the diffusion model (default: the embedded model)")
    bn.add_argument("--ar-model", default=None, help="its AR twin (default: the embedded AR twin)")
    bn.add_argument("--json", default="bench/results/bench.json", help="where to write the results")
    bn.add_argument("--plot", default=None, help="speed-vs-quality PNG (default: the JSON path with .png)")
    bn.add_argument("--length", type=_positive_int, default=None, help="tokens per timed completion (256; quick: 16)")
    bn.add_argument("--prompts", type=_positive_int, default=None, help="timed HumanEval prompts (8; quick: 4)")
    bn.add_argument("--lines", type=_positive_int, default=None, help="held-out lines per configuration (50; quick: 8)")
    bn.add_argument("--heldout", default=None, help="held-out line fixture (default: bench/heldout_lines.jsonl)")
    bn.add_argument("--humaneval-limit", type=int, default=None,
                    help="HumanEval problems for the main configs (default: all 164; quick: 0, the timed prompts)")
    bn.add_argument("--humaneval-batch", type=_positive_int, default=None,
                    help="requests in flight for that HumanEval run (default 16)")
    bn.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    bn.add_argument("--quick", action="store_true", help="few prompts, short length: under 2 minutes on 2 cores")
    bn.set_defaults(func=cmd_bench)
    c = sub.add_parser("convert", help="write a model in our layout or a Hugging Face family's (llama for "
                                        "transformers and llama.cpp, llada, sdar, ...); lossless with --dtype keep")
    c.add_argument("src", help="any model unmask loads: our layout, a supported family's directory, a .gguf file")
    c.add_argument("dst", help="the directory to write (replaced atomically if it is a model directory), or a "
                               "file ending in .gguf for llama.cpp (llama for our AR models, see --gguf-type)")
    c.add_argument("--to", default="unmask", metavar="FAMILY",
                   help=f"target layout, a model_type: {', '.join(CONVERT_TARGETS)} (default: unmask, ours); "
                        "a model the layout cannot hold is refused, naming the feature and the layouts that can")
    c.add_argument("--dtype", choices=["bf16", "fp32", "keep"], default="keep",
                   help="storage dtype of the weights (default: keep, each tensor as stored; GGUF: float32)")
    c.add_argument("--gguf-type", default="F16", metavar="TYPE",
                   help="when DST ends in .gguf (a file for llama.cpp): the tensor type, F32, F16 (default), BF16, "
                        "Q8_0, Q4_0, Q4_1, Q5_0 or Q5_1")
    c.set_defaults(func=cmd_convert)
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
