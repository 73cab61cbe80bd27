"""What `unmask bench` runs, in one place: the decoding configurations, the concurrency levels, the
workload sizes of the full and the quick run, and the targets."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..eval.generate import Decoding

REFERENCE = "reference"
AR = "ar"
MAIN = "threshold-0.9"  # the dLLM configuration the headline targets use

# (system, decoding). system "dllm" runs on --model, "ar" on --ar-model. The policies other than topk
# name their fallback (sampling/policies.py FALLBACKS), so a model's generation_config cannot change
# what a row measures: "-leftmost" rows commit the leftmost masked position when the rule picks none.
BEST, LEFT = "best", "leftmost"
CONFIGS: tuple[tuple[str, Decoding], ...] = (
    ("dllm", Decoding(REFERENCE, "reference", "topk", steps_ratio=1.0)),
    ("dllm", Decoding("topk-L", "engine", "topk", steps_ratio=1.0)),
    ("dllm", Decoding("topk-L/2", "engine", "topk", steps_ratio=0.5)),
    ("dllm", Decoding("topk-L/4", "engine", "topk", steps_ratio=0.25)),
    ("dllm", Decoding("threshold-0.9", "engine", "threshold", 0.9, fallback=BEST)),
    ("dllm", Decoding("threshold-0.7", "engine", "threshold", 0.7, fallback=BEST)),
    ("dllm", Decoding("threshold-0.5", "engine", "threshold", 0.5, fallback=BEST)),
    ("dllm", Decoding("threshold-0.9-leftmost", "engine", "threshold", 0.9, fallback=LEFT)),
    ("dllm", Decoding("threshold-0.7-leftmost", "engine", "threshold", 0.7, fallback=LEFT)),
    # The same tokens as the row above (engine/lookahead.py): how much the engine's block lookahead buys.
    ("dllm", Decoding("threshold-0.7-leftmost-nolookahead", "engine", "threshold", 0.7, fallback=LEFT,
                      lookahead=False)),
    ("dllm", Decoding("threshold-0.6-leftmost", "engine", "threshold", 0.6, fallback=LEFT)),
    ("dllm", Decoding("threshold-0.55-leftmost", "engine", "threshold", 0.55, fallback=LEFT)),
    ("dllm", Decoding("factor-1.0", "engine", "factor", 1.0, fallback=BEST)),
    ("dllm", Decoding("entropy-0.1", "engine", "entropy", 0.1, fallback=BEST)),
    ("dllm", Decoding("margin-0.9", "engine", "margin", 0.9, fallback=BEST)),
    ("dllm", Decoding(MAIN + "-int8", "engine", "threshold", 0.9, quantize="int8", fallback=BEST)),
    ("dllm", Decoding(MAIN + "-int8wo", "engine", "threshold", 0.9, quantize="int8wo", fallback=BEST)),
    ("dllm", Decoding("threshold-0.7-int8wo", "engine", "threshold", 0.7, quantize="int8wo", fallback=BEST)),
    ("dllm", Decoding("threshold-0.7-leftmost-int8wo", "engine", "threshold", 0.7, quantize="int8wo", fallback=LEFT)),
    ("ar", Decoding(AR, "engine", None)),
    ("ar", Decoding(AR + "-int8", "engine", None, quantize="int8")),
    ("ar", Decoding(AR + "-int8wo", "engine", None, quantize="int8wo")),
)
CONCURRENCY = (1, 4, 16)


def ar_baseline(name: str) -> str:
    """The AR run a configuration's "x AR" compares with: the AR twin with the same weights (fp32,
    int8, int8wo), so that quantization speeds up both sides of the ratio or neither."""
    quant = {d.name: d.quantize for _, d in CONFIGS}.get(name)
    return next((d.name for s, d in CONFIGS if s == "ar" and d.quantize == quant), AR)
# HumanEval pass@1 and syntax validity on Workload.humaneval_limit problems, and single-line infilling,
# for these: the configurations the "x AR at equal quality" target turns on, and their AR baselines.
# The rest get pass@1 and syntax validity on the timed prompts only. One timed prompt is 6.25 points
# of syntax validity, so "equal quality" judged on 16 prompts is mostly noise; on 164 a problem is
# 0.6 points.
HUMANEVAL_CONFIGS = (MAIN, "threshold-0.7", "threshold-0.5", "threshold-0.9-leftmost", "threshold-0.7-leftmost",
                     "threshold-0.6-leftmost", "threshold-0.55-leftmost", "factor-1.0", MAIN + "-int8wo",
                     "threshold-0.7-int8wo", "threshold-0.7-leftmost-int8wo", AR, AR + "-int8wo")


@dataclass(frozen=True)
class Workload:
    # The full run took 68 minutes on 2 slow cores in session 11 (the reference sampler alone, one full
    # forward of prompt + 256 tokens per token, 17 of them; the 164-problem HumanEval runs 25, 13 configs).
    length: int = 256  # completion tokens per speed prompt (max_tokens)
    prompts: int = 16  # HumanEval prompts timed at every concurrency (spread over the 164; repeated
    #                    to fill the concurrency when fewer)
    lines: int = 100  # held-out line-completion items (spread over the fixture), per configuration
    line_tokens: int = 24  # max_tokens for one line (95% of the held-out lines fit)
    humaneval_limit: int | None = None  # HumanEval for HUMANEVAL_CONFIGS: 0 = the timed prompts, N = the
    #                                     first N problems, None = all 164
    # Greedy decoding is batch invariant, so 16 in flight give batch 1's completions, 3-6x sooner.
    humaneval_concurrency: int = 16
    infill_problems: int = 40  # single-line infilling for HUMANEVAL_CONFIGS: one line each of N problems
    infill_tokens: int = 48
    timeout: float = 5.0  # seconds per program
    workers: int = 2  # programs run in parallel


FULL = Workload()
# < 2 minutes on 2 cores: 4 prompts (repeated to fill 16 concurrent), short generations, HumanEval
# pass@1 only on the timed prompts.
QUICK = Workload(length=16, prompts=4, lines=8, line_tokens=8, humaneval_limit=0, infill_problems=4, infill_tokens=16)


def workload(quick: bool, **overrides) -> Workload:
    base = QUICK if quick else FULL
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Target:
    key: str
    text: str


TARGETS = (
    Target("engine_vs_reference", "dLLM engine >= 10x reference tok/s at length 256 with <= 1 point quality loss"),
    Target("dllm_vs_ar", "dLLM >= 2x AR twin tok/s at batch 1 at equal quality (<= 1 point loss)"),
    Target("batch_scaling", f"aggregate tok/s at 16 concurrent >= 3x batch 1 ({MAIN})"),
)
TARGET_LENGTH = 256
SPEEDUP_VS_REFERENCE = 10.0
SPEEDUP_VS_AR = 2.0
BATCH_SCALING = 3.0
MAX_QUALITY_LOSS_POINTS = 1.0
# Quality metrics compared for "quality loss" (points = percentage points).
# All four: with a weak model exact match and pass@1 sit at 0 for everyone, and only edit similarity
# and syntax validity still tell the configurations apart.
QUALITY_KEYS = ("line_exact_match", "line_edit_similarity", "pass_at_1", "syntax_valid")
