"""Held-out line completion: given the lines of a held-out Python file up to a point, generate the next
line (until newline) and compare it with the real one: exact match and edit similarity.

The items live in a committed fixture, bench/heldout_lines.jsonl (built once by bench/make_heldout.py
from the corpus's validation packages), so this runs offline on a fresh clone.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from .code_quality import edit_similarity, exact_match, first_line, mean
from .generate import Batch, Decoding, Task, run_tasks

FIELDS = ("prefix", "line")


def default_heldout_path() -> Path:
    from ..pretrained import REPO_ROOT

    return Path(os.environ.get("UNMASK_BENCH_DIR", REPO_ROOT / "bench")) / "heldout_lines.jsonl"


def load_heldout(path: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    path = Path(path) if path is not None else default_heldout_path()
    if not path.is_file():
        raise UserError(f"{path}: held-out line fixture not found; pass --heldout FILE "
                        "(build one with bench/make_heldout.py)")
    items = []
    with path.open(encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: corrupt JSON ({e.msg})") from None
            if not isinstance(item, dict) or not all(isinstance(item.get(k), str) for k in FIELDS):
                raise UserError(f"{path}:{n}: each line needs string fields {', '.join(FIELDS)}")
            items.append(item)
    if not items:
        raise UserError(f"{path}: no items")
    return items[:limit] if limit is not None else items


def score_lines(items: Sequence[dict], completions: Sequence[str]) -> dict:
    """Exact match and edit similarity of each completion's first line against the held-out line."""
    preds = [first_line(c) for c in completions]
    em = [exact_match(p, it["line"]) for p, it in zip(preds, items)]
    sim = [edit_similarity(p, it["line"]) for p, it in zip(preds, items)]
    per = [{"target": it["line"], "generated": p, "exact_match": e, "edit_similarity": round(s, 4)}
           for it, p, e, s in zip(items, preds, em, sim)]
    return {"n": len(items), "exact_match": mean(em), "edit_similarity": mean(sim), "items": per}


def line_tasks(items: Sequence[dict]) -> list[Task]:
    return [Task(it["prefix"]) for it in items]


def evaluate_lines(model, decoding: Decoding, *, items: Sequence[dict] | None = None, limit: int | None = None,
                   max_tokens: int = 32, concurrency: int = 16, progress=None) -> tuple[dict, Batch]:
    items = list(items) if items is not None else load_heldout(limit=limit)
    batch = run_tasks(model, line_tasks(items), decoding, max_tokens=max_tokens, concurrency=concurrency,
                      stop=["\n"], progress=progress)
    return score_lines(items, [c.text for c in batch.completions]), batch
