"""A user's own repository as corpus sources (`unmask data build --from-dir PATH`).

The directory is walked in sorted order (so the corpus is deterministic), skipping version-control,
virtual-environment, cache and build directories and every path an `--exclude` glob matches. Its
Python files go through the same filters and dedup as the PyPI corpus. The unit of the validation
split is the user's choice: a top-level directory (`--split-by dir`; files at the top level form the
unit `.`) or a single file (`--split-by file`); a unit is held out when a hash of its name falls
below `val_frac`, so adding files never moves another unit between splits.

The license report reads a LICENSE / COPYING file at the top, if any, and records what it says;
nothing is left out for its license (the code is the user's own).
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
from pathlib import Path

from ..errors import UserError
from .licenses import LicenseVerdict, _short, _text_verdict
from .sources import Member, Source

SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__", ".venv", "venv", ".tox", ".nox", "node_modules", "build", "dist",
             ".eggs", ".mypy_cache", ".pytest_cache", ".ruff_cache", "site-packages"}
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "COPYING", "COPYING.txt")
SPLITS_BY = ("dir", "file")


def _member(path: Path, rel: str) -> Member:
    return Member(rel, path.stat().st_size, path.read_bytes)


def repo_license(root: Path) -> LicenseVerdict:
    for name in LICENSE_FILES:
        f = root / name
        if f.is_file():
            text = f.read_text(encoding="utf-8", errors="replace")
            first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
            v = _text_verdict(text)
            kind = {True: "permissive", False: "copyleft", None: "not recognised"}[v]
            return LicenseVerdict(_short(first), True, f"{name}: {kind} (your own code: kept whatever it says)")
    return LicenseVerdict("", True, "no LICENSE or COPYING file at the top (your own code: kept)")


def held_out(unit: str, val_frac: float) -> bool:
    h = int.from_bytes(hashlib.sha256(unit.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < val_frac


def dir_sources(root: str | Path, exclude: list[str], split_by: str, val_frac: float
                ) -> tuple[list[Source], list[str], LicenseVerdict]:
    """(one Source per split unit, the units held out, the license report)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--from-dir {root}: not a directory")
    if split_by not in SPLITS_BY:
        raise UserError(f"--split-by {split_by!r}: choose dir or file")
    if not 0.0 <= val_frac < 1.0:
        raise UserError(f"--val-frac {val_frac}: must be in [0, 1)")
    units: dict[str, list[Member]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")
                             and not any(fnmatch.fnmatch(rel_dir + d, g) or fnmatch.fnmatch(rel_dir + d + "/", g)
                                         for g in exclude))
        for name in sorted(filenames):
            rel = rel_dir + name
            if not name.endswith(".py") or any(fnmatch.fnmatch(rel, g) for g in exclude):
                continue
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            unit = rel if split_by == "file" else (rel.split("/", 1)[0] if "/" in rel else ".")
            units.setdefault(unit, []).append(_member(path, rel))
    if not units:
        raise UserError(f"--from-dir {root}: no Python source files found"
                        + (f" (after --exclude {' '.join(exclude)})" if exclude else ""))
    names = sorted(units)
    val = [u for u in names if held_out(u, val_frac)]
    if val_frac > 0 and not val and len(names) > 1:
        val = [min(names, key=lambda u: hashlib.sha256(u.encode()).hexdigest())]  # at least one unit held out
    if len(val) == len(names):
        val = val[:-1]  # and at least one to train on
    verdict = repo_license(root)
    sources = [Source(u, "local", None, units[u], license_override=verdict.license or "unknown") for u in names]
    return sources, val, verdict
