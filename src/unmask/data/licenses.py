"""Is a package's license permissive? Read from its core metadata, conservatively.

Only permissive licenses go into the corpus, so a model trained on it carries no copyleft
obligations. Anything unclear (missing, unknown, mixed with copyleft) is skipped, with the reason.

Precedence: PEP 639 `License-Expression` (SPDX, authoritative) > `License ::` classifiers (curated
and short) > the free-form `License` field (often the whole license text, which may mention
bundled third-party licenses; hence last).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from email.parser import HeaderParser

PERMISSIVE_SPDX = {
    s.lower()
    for s in (
        "MIT", "MIT-0", "MIT-CMU", "X11", "BSD-1-Clause", "BSD-2-Clause", "BSD-3-Clause",
        "BSD-3-Clause-Clear", "0BSD", "Apache-1.1", "Apache-2.0", "PSF-2.0", "Python-2.0",
        "Python-2.0.1", "CNRI-Python", "ISC", "Unlicense", "Zlib", "HPND", "CC0-1.0", "BSL-1.0",
        "NCSA", "UPL-1.0", "PostgreSQL", "curl", "BlueOak-1.0.0", "WTFPL",
        "LicenseRef-Public-Domain",
    )
}

_PERMISSIVE_TEXT = re.compile(
    r"\bMIT\b|\bBSD\b|\bApache\b|\bPSF\b|Python Software Foundation|\bISC\b|\bUnlicense\b"
    r"|\b0BSD\b|\bzlib\b|\bHPND\b|Historical Permission Notice|public[ -]domain|\bCC0\b"
    r"|Boost Software License|Permission is hereby granted, free of charge"
    r"|Redistribution and use in source and binary forms",
    re.I,
)
_COPYLEFT_TEXT = re.compile(
    r"\b(A|L)?GPL|General Public Licen[cs]e|\bMPL\b|Mozilla Public|\bEUPL\b|\bCDDL\b|\bEPL\b"
    r"|Eclipse Public|\bSSPL\b|Server Side Public|\bBUSL\b|Business Source|\bproprietary\b"
    r"|ShareAlike|CC-BY-SA|CC-BY-NC|Non-?Commercial|Artistic",
    re.I,
)


@dataclass(frozen=True)
class LicenseVerdict:
    license: str  # a short label for the manifest, e.g. "BSD-3-Clause" or "MIT License"
    ok: bool
    reason: str  # why it was rejected ("" when ok)


def parse_metadata(text: str) -> dict[str, list[str]]:
    """The license-related headers of a METADATA / PKG-INFO file."""
    msg = HeaderParser().parsestr(text)
    return {
        "expression": [str(v).strip() for v in msg.get_all("License-Expression") or []],
        "license": [str(v).strip() for v in msg.get_all("License") or []],
        "classifiers": [
            str(c).strip() for c in msg.get_all("Classifier") or [] if str(c).startswith("License ::")
        ],
    }


def _tokens(expr: str) -> list[str]:
    return re.findall(r"\(|\)|[^\s()]+", expr)


def spdx_permissive(expr: str) -> bool | None:
    """Evaluate an SPDX expression: True if permissive, False if not, None if it does not parse."""
    toks = _tokens(expr)
    pos = 0

    def peek() -> str | None:
        return toks[pos] if pos < len(toks) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return toks[pos - 1]

    def factor() -> bool:
        t = take()
        if t == "(":
            v = disj()
            if take() != ")":
                raise ValueError
            return v
        if t.upper() in ("AND", "OR", "WITH", ")"):
            raise ValueError
        if (peek() or "").upper() == "WITH":  # exceptions only add permissions
            take()
            take()
        return t.rstrip("+").lower() in PERMISSIVE_SPDX

    def conj() -> bool:
        v = factor()
        while (peek() or "").upper() == "AND":
            take()
            v = factor() and v
        return v

    def disj() -> bool:
        v = conj()
        while (peek() or "").upper() == "OR":
            take()
            v = conj() or v
        return v

    try:
        v = disj()
    except (ValueError, IndexError):
        return None
    return v if pos == len(toks) else None


def _text_verdict(text: str) -> bool | None:
    if _COPYLEFT_TEXT.search(text):
        return False
    if _PERMISSIVE_TEXT.search(text):
        return True
    return None


def _short(text: str, n: int = 60) -> str:
    line = " ".join(text.split())
    return line if len(line) <= n else line[: n - 3] + "..."


def classify(metadata_text: str | None) -> LicenseVerdict:
    if not metadata_text:
        return LicenseVerdict("", False, "no metadata (METADATA / PKG-INFO) found")
    meta = parse_metadata(metadata_text)
    if meta["expression"]:
        expr = meta["expression"][0]
        v = spdx_permissive(expr)
        if v is None:
            return LicenseVerdict(expr, False, f"license expression {expr!r} does not parse")
        return LicenseVerdict(expr, v, "" if v else f"license {expr!r} is not permissive")
    # "License :: OSI Approved" alone names no license; only the specific ones count.
    tails = [c.split("::")[-1].strip() for c in meta["classifiers"]]
    specific = [t for t in tails if t and t != "OSI Approved"]
    if specific:
        label = " / ".join(specific)
        verdicts = [_text_verdict(c) for c in specific]
        ok = all(v is True for v in verdicts)
        return LicenseVerdict(label, ok, "" if ok else f"license {label!r} is not permissive")
    text = next((t for t in meta["license"] if t and t.upper() != "UNKNOWN"), "")
    if not text:
        return LicenseVerdict("", False, "no license in the package metadata")
    label = _short(text)
    v = _text_verdict(text)
    if v is None:
        return LicenseVerdict(label, False, f"license {label!r} is not recognised as permissive")
    return LicenseVerdict(label, v, "" if v else f"license {label!r} is not permissive")
