"""Atomic file writes: a file appears at its path complete, or not at all.

Everything unmask writes (configs, checkpoints, corpora) goes through here, so a crash or a full
disk never leaves a half-written file where a reader would take it for a good one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def default_mode() -> int:
    """0666 minus the umask: what a plain open() would have created (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """A file that appears at `path` only once the block finishes without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        kw = {"encoding": "utf-8", "newline": "\n"} if "b" not in mode else {}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def staged_dir(out: Path, keep: tuple[str, ...] = ()) -> Iterator[Path]:
    """A directory that appears at `out` complete, or not at all: the block writes into a temporary
    directory beside `out`, renamed to `out` when the block finishes without an error (replacing an old
    `out`, whose files named in `keep` are carried over where the new one lacks them) and removed when
    it raises. An interruption between moving the old `out` aside and moving the new one in puts the
    old one back."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    umask = os.umask(0)
    os.umask(umask)
    old = out.with_name(f".{out.name}.old")
    try:
        yield tmp
        # mkdtemp makes the directory 0700; it should be as readable as any other new directory.
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            for name in keep:
                if not (tmp / name).exists() and (out / name).exists():
                    shutil.copy2(out / name, tmp / name)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # interrupted between the two renames: put the previous one back
        raise
