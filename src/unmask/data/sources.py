"""Where corpus files come from: the running interpreter's stdlib, and pinned PyPI archives.

Archives are fetched with pip itself (the ordinary client, honouring the user's pip config) into
a cache directory, and .py files are read straight out of the wheel zip or sdist tarball; nothing
is installed or unpacked to disk.
"""
from __future__ import annotations

import logging
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .manifest import canonical_name

log = logging.getLogger("unmask.data")

SDIST_EXTS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip", ".tar")


@dataclass
class Member:
    path: str  # inside the package, '/'-separated
    size: int
    read: Callable[[], bytes]


@dataclass
class Source:
    name: str
    version: str
    metadata: str | None  # METADATA / PKG-INFO text; None for the stdlib (license known)
    members: list[Member] = field(default_factory=list)
    archive: str = ""  # file name of the archive ("" for the stdlib)
    archive_path: Path | None = None
    license_override: str | None = None


# ---- stdlib ------------------------------------------------------------------------------------
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib-dynload"}


def stdlib_sources() -> list[Source]:
    """The stdlib as packages: `stdlib` (top-level modules) and `stdlib-<dir>` per subpackage."""
    root = Path(sysconfig.get_paths()["stdlib"])
    version = platform.python_version()
    groups: dict[str, list[Member]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted and pruned in place so the walk order (and so the corpus) is stable.
        dirnames[:] = sorted(
            d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")
        )
        rel_dir = Path(dirpath).relative_to(root)
        group = "stdlib" if rel_dir == Path(".") else f"stdlib-{rel_dir.parts[0]}"
        for fn in sorted(filenames):
            full = Path(dirpath) / fn
            if not full.is_file() or full.is_symlink():
                continue
            rel = (rel_dir / fn).as_posix()
            groups.setdefault(group, []).append(
                Member(rel, full.stat().st_size, lambda p=full: p.read_bytes())
            )
    out = []
    for name in sorted(groups):
        members = sorted(groups[name], key=lambda m: m.path)
        if any(m.path.endswith(".py") for m in members):
            out.append(Source(name, version, None, members, license_override="PSF-2.0"))
    return out


# ---- PyPI archives -----------------------------------------------------------------------------
def _archive_id(filename: str) -> tuple[str, str, bool] | None:
    """(canonical name, version, is_wheel) from an archive file name, or None."""
    if filename.endswith(".whl"):
        parts = filename[:-4].split("-")
        if len(parts) >= 5:
            return canonical_name(parts[0]), parts[1].lower(), True
        return None
    for ext in SDIST_EXTS:
        if filename.endswith(ext):
            name, _, version = filename[: -len(ext)].rpartition("-")
            if name:
                return canonical_name(name), version.lower(), False
    return None


def _wheel_rank(filename: str) -> int:
    """Lower is better: a wheel built for this interpreter, then a pure one, then anything."""
    tags = filename[:-4].split("-")[-3:]
    cp = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if tags[0] == cp or (tags[1] == "abi3" and tags[0].startswith("cp3")):
        return 0
    if tags[1] == "none" and tags[2] == "any":
        return 1
    return 2


def find_cached(cache: Path, name: str, version: str) -> Path | None:
    if not cache.is_dir():
        return None
    want = (canonical_name(name), version.lower())
    wheels, sdists = [], []
    for p in sorted(cache.iterdir()):
        ident = _archive_id(p.name)
        if ident and ident[:2] == want and p.is_file():
            (wheels if ident[2] else sdists).append(p)
    if wheels:
        return min(wheels, key=lambda p: (_wheel_rank(p.name), p.name))
    return sdists[0] if sdists else None


def fetch(name: str, version: str, cache: Path, find_links: Path | None = None) -> Path:
    """The archive of name==version in `cache`, downloading it with pip if it is not there yet."""
    hit = find_cached(cache, name, version)
    if hit:
        return hit
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--dest", str(cache)]
    if find_links is not None:
        cmd += ["--no-index", "--find-links", str(find_links)]
    cmd.append(f"{name}=={version}")
    log.info("download %s==%s", name, version)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = [ln.strip() for ln in (r.stderr or r.stdout).splitlines() if ln.strip()]
        why = tail[-1] if tail else f"pip exited with {r.returncode}"
        raise UserError(
            f"package {name}=={version}: pip download failed ({why}); check the name and that "
            "this exact version exists on PyPI for this Python"
        )
    hit = find_cached(cache, name, version)
    if hit is None:  # pip normalised the version differently; trust what it says it saved
        m = re.findall(r"(?:Saved|File was already downloaded) (.+)", r.stdout)
        if m and Path(m[-1].strip()).is_file():
            hit = Path(m[-1].strip())
    if hit is None:
        raise UserError(f"package {name}=={version}: pip reported success but no archive is in {cache}")
    return hit


def _zip_source(path: Path, is_wheel: bool) -> tuple[str | None, list[Member]]:
    zf = zipfile.ZipFile(path)
    infos = [i for i in zf.infolist() if not i.is_dir()]
    meta_name = None
    if is_wheel:
        metas = [i.filename for i in infos if re.fullmatch(r"[^/]+\.dist-info/METADATA", i.filename)]
        meta_name = metas[0] if metas else None
    else:
        metas = [i.filename for i in infos if re.fullmatch(r"[^/]+/PKG-INFO", i.filename)]
        meta_name = metas[0] if metas else None
    metadata = zf.read(meta_name).decode("utf-8", "replace") if meta_name else None
    members = []
    for info in infos:
        rel = info.filename
        if is_wheel:
            if re.match(r"[^/]+\.dist-info/", rel):
                continue
            rel = re.sub(r"^[^/]+\.data/(purelib|platlib|scripts)/", "", rel)
        else:
            rel = rel.split("/", 1)[1] if "/" in rel else rel
        members.append(Member(rel, info.file_size, lambda n=info.filename: zf.read(n)))
    return metadata, members


def _tar_source(path: Path, max_bytes: int) -> tuple[str | None, list[Member]]:
    # A compressed tar cannot seek cheaply, so read the (small enough) .py files in one pass.
    metadata = None
    members = []
    with tarfile.open(path) as tf:
        for ti in tf:
            if not ti.isfile():
                continue
            parts = ti.name.split("/", 1)
            rel = parts[1] if len(parts) == 2 else parts[0]
            if rel == "PKG-INFO":
                metadata = tf.extractfile(ti).read().decode("utf-8", "replace")
            data = b""
            if rel.endswith(".py") and ti.size <= max_bytes:
                data = tf.extractfile(ti).read()
            members.append(Member(rel, ti.size, lambda d=data: d))
    return metadata, members


def archive_source(name: str, version: str, path: Path, max_bytes: int) -> Source:
    try:
        if path.name.endswith(".whl"):
            metadata, members = _zip_source(path, is_wheel=True)
        elif path.name.endswith(".zip"):
            metadata, members = _zip_source(path, is_wheel=False)
        else:
            metadata, members = _tar_source(path, max_bytes)
    except (zipfile.BadZipFile, tarfile.TarError, OSError, EOFError) as e:
        raise UserError(
            f"{path}: cannot read the archive of {name}=={version} ({e}); delete it from the "
            "cache and build again"
        ) from None
    members.sort(key=lambda m: m.path)
    return Source(name, version, metadata, members, archive=path.name, archive_path=path)
