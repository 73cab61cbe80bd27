"""The on-disk corpus: flat token streams (`<split>.bin`) described by `manifest.json`.

A .bin is the concatenation, in document order, of each document's tokens followed by the eos
id, as little-endian uint16 (uint32 when the vocabulary does not fit). `manifest.json` is written
last, so a directory with one describes complete, checksummed files.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fsutil import atomic_open  # noqa: F401  (re-exported for data.build)

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def document_text(package: str, path: str, text: str, header: bool = True) -> str:
    """A corpus file as the model sees it: a one-line `# <package>/<path>` comment, then the file."""
    return f"# {package}/{path}\n{text}" if header else text


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _missing(d: Path) -> str:
    return f"build it with `unmask data build --out {d}`"


def corpus_meta(corpus_dir: str | os.PathLike) -> dict:
    """The corpus's manifest.json (splits[split] has docs, bytes, tokens, sha256, file)."""
    d = Path(corpus_dir)
    if not d.is_dir():
        raise UserError(f"{d}: corpus directory not found; {_missing(d)}")
    path = d / MANIFEST
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{d}: no {MANIFEST}; {_missing(d)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); the corpus is corrupt, rebuild it "
                        f"with `unmask data build --out {d}`") from None
    ok = isinstance(meta, dict) and isinstance(meta.get("splits"), dict) and "dtype" in meta
    ok = ok and all(
        isinstance(s, dict) and {"bytes", "tokens", "file"} <= s.keys()
        for s in meta["splits"].values()
    )
    if not ok:
        raise UserError(f"{path}: not a corpus manifest (no splits/dtype); rebuild it with "
                        f"`unmask data build --out {d}`")
    return meta


def load_split(corpus_dir: str | os.PathLike, split: str) -> np.memmap:
    """The 1-D token stream of a split, memory-mapped read-only."""
    d = Path(corpus_dir)
    meta = corpus_meta(d)
    if split not in meta["splits"]:
        raise UserError(f"{d}: has no split {split!r} (it has {', '.join(meta['splits'])}); "
                        "use train or val")
    info = meta["splits"][split]
    path = d / info["file"]
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise UserError(f"{path}: missing; the corpus is incomplete, {_missing(d)}") from None
    if size != info["tokens"] * dtype.itemsize:
        raise UserError(f"{path}: is {size} bytes but {MANIFEST} says {info['tokens']} tokens; "
                        f"the corpus is corrupt, {_missing(d)}")
    if info["tokens"] == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")
