"""Text-level code quality: where a generated function body ends, whether it parses, and how close a
generated line is to the real one. Pure functions, no model and no execution."""
from __future__ import annotations

import ast
import warnings

# A line at column 0 that starts with one of these ends a generated function body (the Codex/HumanEval
# convention: "\ndef", "\nclass", "\nif", "\nprint", "\n#", plus decorators and imports).
STOP_PREFIXES = ("def ", "async def ", "class ", "if ", "print(", "#", "@", "import ", "from ", "assert ")


def truncate_completion(completion: str, at_line_start: bool = True) -> str:
    """Cut a generated function body at the first top-level statement that starts something else.

    `at_line_start`: the prompt ended with a newline, so the completion's first line is a full line
    (and is checked too). Otherwise its first line continues the prompt's last line and is kept.
    """
    pos = 0
    for i, line in enumerate(completion.split("\n")):
        if (i > 0 or at_line_start) and line.startswith(STOP_PREFIXES):
            return completion[:pos]  # everything before the stop line, its newlines included
        pos += len(line) + 1
    return completion


def first_line(text: str) -> str:
    """Everything before the first newline (generation "until newline")."""
    return text.split("\n", 1)[0]


def first_nonblank_line(text: str) -> str:
    """The first line of `text` holding anything but whitespace ("" if none). An infilled line whose
    prefix ends at a line start: a model that writes a line break first (the prompt's blank line above,
    or a trailing space before its newline, is one it was not trained to repeat) still wrote the line."""
    return next((ln for ln in text.split("\n") if ln.strip()), "")


def syntax_valid(code: str) -> bool:
    """Does `code` parse as Python? (ast.parse only: nothing is executed.)"""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like are warnings, not errors
            ast.parse(code)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return False


def normalize_line(line: str) -> str:
    """Lines are compared without trailing whitespace or a carriage return; indentation counts."""
    return line.rstrip()


def exact_match(pred: str, target: str) -> bool:
    return normalize_line(pred) == normalize_line(target)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), O(len(a) * len(b))."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def edit_similarity(pred: str, target: str) -> float:
    """1 - Levenshtein distance / the longer length, on normalized lines; 1.0 for two empty lines."""
    a, b = normalize_line(pred), normalize_line(target)
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0
