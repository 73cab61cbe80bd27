"""Build bench/heldout_lines.jsonl: (prefix, next line) pairs from the corpus's held-out packages.

Run once, from the repository root, after `unmask data build --out corpus/default`:

    .venv/bin/python bench/make_heldout.py --corpus corpus/default --out bench/heldout_lines.jsonl

The validation packages (configs/corpus/default.toml, `val_packages`) are never trained on, so the
fixture measures completion of unseen code. The output is committed, so the benchmark runs offline
on a fresh clone without the corpus. Deterministic: the same corpus and seed give the same file.

Each item: {"package", "path", "lineno" (1-based line number of `line`), "prefix" (the file's lines
before it, at most --max-prefix-lines lines and --max-prefix-chars characters, cut at a line
boundary, ending with a newline), "line" (the next line, without its newline)}.
The excerpts come from networkx, flask, werkzeug (BSD-3-Clause), sqlglot (MIT) and tornado
(Apache-2.0), under their licenses; each item names its source file.
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tokenize
import tomllib
from pathlib import Path


def excluded_lines(text: str) -> set[int] | None:
    """1-based numbers of lines inside multi-line strings or holding only a comment; None if it does not tokenize."""
    out = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
                out.update(range(tok.start[0], tok.end[0] + 1))
            elif tok.type == tokenize.COMMENT and tok.line.strip().startswith("#"):
                out.add(tok.start[0])
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return None
    return out


def candidates(text: str, min_context: int, min_chars: int, max_chars: int) -> list[int]:
    """0-based indices of lines worth predicting: code (not docstring, not comment), of moderate length."""
    bad = excluded_lines(text)
    if bad is None:
        return []
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        s = line.strip()
        if i < min_context or (i + 1) in bad or not (min_chars <= len(s) <= max_chars) or len(line) > max_chars + 40:
            continue
        if s in (")", "]", "}", "):", "else:", "try:", "pass") or not s.isascii():
            continue
        out.append(i)
    return out


def make_prefix(lines: list[str], i: int, max_lines: int, max_chars: int) -> str:
    start = max(0, i - max_lines)
    while start < i and sum(len(x) + 1 for x in lines[start:i]) > max_chars:
        start += 1
    return "".join(x + "\n" for x in lines[start:i])


def build(corpus: Path, manifest: Path, n: int, seed: int, max_prefix_lines: int, max_prefix_chars: int) -> list[dict]:
    val_packages = tomllib.loads(manifest.read_text())["corpus"]["val_packages"]
    docs: dict[str, list[dict]] = {p: [] for p in val_packages}
    with (corpus / "text" / "val.jsonl").open(encoding="utf-8") as f:
        for raw in f:
            d = json.loads(raw)
            if d["package"] in docs and d["path"].endswith(".py"):
                docs[d["package"]].append(d)
    rng = random.Random(seed)
    per_pkg = [n // len(val_packages) + (k < n % len(val_packages)) for k in range(len(val_packages))]
    items = []
    for pkg, want in zip(val_packages, per_pkg):
        files = sorted(docs[pkg], key=lambda d: d["path"])
        rng.shuffle(files)
        got = 0
        for d in files:
            if got == want:
                break
            idx = candidates(d["text"], 8, 8, 80)
            if not idx:
                continue
            i = rng.choice(idx)
            lines = d["text"].split("\n")
            prefix = make_prefix(lines, i, max_prefix_lines, max_prefix_chars)
            if prefix.count("\n") < 4:
                continue
            items.append({"package": pkg, "path": d["path"], "lineno": i + 1, "prefix": prefix, "line": lines[i]})
            got += 1
        if got < want:
            sys.exit(f"{pkg}: only {got} of {want} usable files")
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("corpus/default"))
    ap.add_argument("--manifest", type=Path, default=Path("configs/corpus/default.toml"))
    ap.add_argument("--out", type=Path, default=Path("bench/heldout_lines.jsonl"))
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prefix-lines", type=int, default=30)
    ap.add_argument("--max-prefix-chars", type=int, default=1200)
    a = ap.parse_args()
    items = build(a.corpus, a.manifest, a.n, a.seed, a.max_prefix_lines, a.max_prefix_chars)
    a.out.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    print(f"wrote {len(items)} items to {a.out}")


if __name__ == "__main__":
    main()
