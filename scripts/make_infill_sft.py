"""Single-line fill-in-the-middle examples for `unmask finetune`, cut from functions of a built corpus.

    .venv/bin/python scripts/make_infill_sft.py --corpus corpus/default --split train --n 3000 --out infill.jsonl

Each example is shaped like a HumanEval infilling case (eval/humaneval.py `infill_cases`): the prefix
is the function up to a line (every line ending in a newline), the middle is that line with its
indentation, the suffix is a newline and the rest of the function. Lines are drawn from function
bodies (not the `def` line, not blank, not a docstring or comment) of functions of 3 to 60 lines,
at most 2 per function, from a random share (--doc-rate) of the documents, so that the examples
spread over many packages. Only the `train` split should feed a
fine-tune that is then measured on held-out code.
"""
from __future__ import annotations

import argparse
import ast
import json
import random
import sys

from unmask.tokenizer.bpe import iter_split_texts


def functions(text: str):
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return
    lines = text.split("\n")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
            start = node.lineno - 1 - len(node.decorator_list)
            body = lines[start:node.end_lineno]
            if 3 <= len(body) <= 60:
                first = node.body[0]
                skip_to = first.end_lineno if isinstance(first, ast.Expr) and isinstance(
                    getattr(first, "value", None), ast.Constant) else first.lineno - 1
                yield body, max(skip_to - start, node.lineno - start)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", default="corpus/default")
    ap.add_argument("--split", default="train")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--per-function", type=int, default=2)
    ap.add_argument("--max-chars", type=int, default=1500, help="prefix + middle + suffix at most this long")
    ap.add_argument("--doc-rate", type=float, default=0.05, help="share of documents used")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    out = []
    for doc in iter_split_texts(a.corpus, a.split):
        if rng.random() >= a.doc_rate:
            continue
        for body, first in functions(doc):
            cand = [i for i in range(first, len(body)) if body[i].strip() and not body[i].strip().startswith("#")]
            for i in rng.sample(cand, min(a.per_function, len(cand))):
                rec = {"prefix": "".join(ln + "\n" for ln in body[:i]), "suffix": "\n" + "\n".join(body[i + 1:]),
                       "middle": body[i]}
                if sum(map(len, rec.values())) <= a.max_chars:
                    out.append(rec)
        if len(out) >= a.n:
            break
    out = out[: a.n]
    with open(a.out, "w") as f:
        for rec in out:
            f.write(json.dumps(rec) + "\n")
    print(f"{len(out)} examples -> {a.out}")
    return 0 if out else 1


if __name__ == "__main__":
    sys.exit(main())
