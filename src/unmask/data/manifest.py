"""The pinned corpus manifest (TOML): which sources, which filters, which packages are validation.

Strict on purpose: an unknown key or an unpinned version is an error, because a corpus that
silently changes when PyPI does cannot be reproduced.
"""
from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import UserError

_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
# An exact PEP 440 version (optionally with epoch and local part); no operators, no wildcards.
_VERSION_RE = re.compile(r"^(\d+!)?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?(\+[A-Za-z0-9.]+)?$")

# Hints appended to a validation message, keyed by the last field name of the error location.
_HINTS = {
    "version": 'pin an exact version, e.g. version = "1.2.3"',
    "name": "give the PyPI project name",
    "val_packages": "name packages listed in the manifest (or stdlib / stdlib-<dir>)",
}


def canonical_name(name: str) -> str:
    """PEP 503 normalisation, so `Scikit_Learn` and `scikit-learn` are the same package."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CorpusSettings(_Strict):
    stdlib: bool = True
    vocab_size: int = Field(8192, ge=266, lt=2**32)
    max_file_bytes: int = Field(500_000, gt=0)
    max_line_chars: int = Field(1000, gt=0)
    max_mean_line_chars: float = Field(100.0, gt=0)
    min_lines: int = Field(3, ge=0)  # fewer code lines (not blank, not comment) = near-empty
    minhash_threshold: float = Field(0.85, gt=0, le=1)
    minhash_perms: int = Field(128, ge=16, le=512)
    shingle_tokens: int = Field(5, ge=1, le=32)
    seed: int = Field(1, ge=0)
    val_packages: list[str] = []
    max_mb: float | None = Field(None, gt=0)
    doc_header: bool = True  # prefix each document with `# <package>/<path>`


class PackageSpec(_Strict):
    name: str
    version: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError(f"{v!r} is not a valid package name")
        return v

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not _VERSION_RE.match(v):
            raise ValueError(f"{v!r} is not an exact version")
        return v


class CorpusManifest(_Strict):
    corpus: CorpusSettings = CorpusSettings()
    package: list[PackageSpec] = []

    @model_validator(mode="after")
    def _check(self):
        seen: set[str] = set()
        for spec in self.package:
            key = canonical_name(spec.name)
            if key in seen or key == "stdlib" or key.startswith("stdlib-"):
                raise ValueError(f"package {spec.name!r} is listed twice or clashes with stdlib")
            seen.add(key)
        for v in self.corpus.val_packages:
            key = canonical_name(v)
            if key not in seen and not (key == "stdlib" or key.startswith("stdlib-")):
                raise ValueError(f"val_packages names {v!r}, which is not a [[package]] in this file")
        return self


def _loc(loc: tuple) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _line_of(text: str, loc: tuple) -> int | None:
    """Best-effort source line for an error location: the n-th [[package]] or the [corpus] table."""
    lines = text.splitlines()
    if loc and loc[0] == "package" and len(loc) > 1 and isinstance(loc[1], int):
        n = -1
        for i, line in enumerate(lines, 1):
            if re.match(r"\s*\[\[\s*package\s*\]\]", line):
                n += 1
                if n == loc[1]:
                    return i
    if loc and loc[0] == "corpus":
        for i, line in enumerate(lines, 1):
            if len(loc) > 1 and re.match(rf"\s*{re.escape(str(loc[1]))}\s*=", line):
                return i
        for i, line in enumerate(lines, 1):
            if re.match(r"\s*\[\s*corpus\s*\]", line):
                return i
    return None


def _format_error(path: Path, text: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    msg = first["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    msg = msg[0].lower() + msg[1:] if msg else msg
    field = next((p for p in reversed(loc) if isinstance(p, str)), "")
    if first["type"] == "extra_forbidden":
        hint = "remove it or fix its spelling"
    elif first["type"] == "missing" and field in _HINTS:
        hint = _HINTS[field]
    else:
        hint = _HINTS.get(field, "fix that field")
    line = _line_of(text, loc)
    where = f"{path}:{line}" if line else str(path)
    return f"{where}: {_loc(loc)}: {msg}; {hint}"


def load_manifest(path: str | Path) -> tuple[CorpusManifest, str]:
    """Parse and validate a corpus manifest. Returns it with the sha256 of the file's bytes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: manifest not found; pass a file under configs/corpus/") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory; pass a manifest .toml file") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the manifest as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e}); fix the syntax") from None
    try:
        manifest = CorpusManifest.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_error(path, text, e)) from None
    return manifest, hashlib.sha256(raw).hexdigest()


def repo_root() -> Path:
    # src/unmask/data/manifest.py -> the repository root (the package is installed editable).
    return Path(__file__).resolve().parents[3]


def default_manifest_path() -> Path:
    path = repo_root() / "configs" / "corpus" / "default.toml"
    if not path.is_file():
        raise UserError(
            f"{path}: default corpus manifest not found (unmask is not installed from its "
            "repository); pass --manifest FILE"
        )
    return path
