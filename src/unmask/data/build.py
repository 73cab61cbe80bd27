"""`unmask data build`: manifest -> filtered, deduplicated, split, tokenized corpus directory.

Determinism is the contract: the same manifest on the same Python gives byte-identical .bin files
and manifest.json. Everything is processed in a fixed order (validation packages first, then the
rest in manifest order, archive paths sorted) and nothing time- or host-dependent is recorded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import UserError
from ..tokenizer import MIN_VOCAB, Tokenizer, train_tokenizer
from . import filters
from .dedup import Deduper
from .licenses import LicenseVerdict, classify
from .manifest import PackageSpec, canonical_name, default_manifest_path, load_manifest, repo_root
from .shards import MANIFEST, SPLITS, atomic_open, document_text, file_sha256, token_dtype
from .sources import Source, archive_source, fetch, stdlib_sources

log = logging.getLogger("unmask.data")

FORMAT = 1
_TOKENIZE_CHUNK = 256  # documents per encode_batch call
DEDUP_POLICY = (
    "validation packages are processed first, so when a training file duplicates a validation "
    "file (exactly or nearly) the training copy is dropped"
)


def default_cache() -> Path:
    root = repo_root()
    if (root / "pyproject.toml").is_file():
        return root / "data_cache"
    return Path.home() / ".cache" / "unmask" / "pypi"


def _is_val(name: str, val: set[str]) -> bool:
    return canonical_name(name) in val


def _load(task: Source | PackageSpec, cache: Path, find_links: Path | None, max_bytes: int) -> Source:
    if isinstance(task, Source):
        return task
    path = fetch(task.name, task.version, cache, find_links)
    return archive_source(task.name, task.version, path, max_bytes)


def _collect(tasks, cfg, val: set[str], cap: int | None, cache: Path, find_links: Path | None):
    """Filter, dedup and size-cap every package. Returns (kept rows, package records, skipped, dedup)."""
    dedup = Deduper(cfg.minhash_threshold, cfg.minhash_perms, cfg.shingle_tokens, cfg.seed)
    split_of: dict[str, str] = {}  # kept file key -> split, to spot duplicates across the split
    cross = 0
    kept: list[tuple[str, str, str, str]] = []  # (split, package, path, text)
    records, skipped = [], []
    total = 0
    capped = False
    for task in tasks:
        name, version = task.name, task.version
        split = "val" if _is_val(name, val) else "train"
        if capped:
            skipped.append({"name": name, "version": version, "license": "",
                            "reason": f"size cap of {cap / 1e6:g} MB reached"})
            continue
        src = _load(task, cache, find_links, cfg.max_file_bytes)
        verdict = LicenseVerdict(src.license_override, True, "") if src.license_override else classify(src.metadata)
        if not verdict.ok:
            log.warning("skip %s %s: %s", name, version, verdict.reason)
            skipped.append({"name": name, "version": version, "license": verdict.license,
                            "reason": verdict.reason})
            continue
        rec = {"name": name, "version": version, "split": split, "license": verdict.license,
               "archive": src.archive, "files": 0, "bytes": 0, "skipped": Counter(),
               "truncated": False}
        if src.archive_path is not None:
            rec["archive_sha256"] = file_sha256(src.archive_path)
        t0 = time.monotonic()
        for m in src.members:
            reason, text = filters.check(m, cfg)
            if reason:
                rec["skipped"][reason] += 1
                continue
            key = f"{name}/{m.path}"
            dup = dedup.add(key, text)
            if dup:
                kind, other = dup
                rec["skipped"][f"{kind}_dup"] += 1
                if split_of[other] != split:
                    cross += 1
                continue
            n = len(text.encode("utf-8"))
            if split == "train" and cap is not None and total + n > cap:
                rec["truncated"] = capped = True
                log.info("size cap of %g MB reached in %s", cap / 1e6, name)
                break
            total += n
            split_of[key] = split
            kept.append((split, name, m.path, text))
            rec["files"] += 1
            rec["bytes"] += n
        rec["skipped"] = dict(sorted(rec["skipped"].items()))
        log.info("%s %s [%s]: kept %d files, %.2f MB; skipped %s (%.1fs)", name, version, split,
                 rec["files"], rec["bytes"] / 1e6, rec["skipped"] or "nothing",
                 time.monotonic() - t0)
        records.append(rec)
        if split == "val" and cap is not None and total >= cap:
            raise UserError(
                f"max_mb={cap / 1e6:g} leaves no room for training data: the validation packages "
                f"alone are {total / 1e6:.3g} MB; raise --max-mb or hold out fewer packages"
            )
    dedup_info = {**dedup.counts, "cross_split": cross, "threshold": cfg.minhash_threshold,
                  "num_perm": cfg.minhash_perms, "shingle_tokens": cfg.shingle_tokens,
                  "policy": DEDUP_POLICY}
    return kept, records, skipped, dedup_info


def _tokenize_split(tok: Tokenizer, docs: list[str], path: Path, dtype: np.dtype, desc: str) -> dict:
    h = hashlib.sha256()
    ntok = 0
    eos = tok.eos_id
    with atomic_open(path, "wb") as f, tqdm(total=len(docs), desc=desc, unit="doc",
                                             mininterval=2.0) as bar:
        for i in range(0, len(docs), _TOKENIZE_CHUNK):
            # Source files that contain "<|endoftext|>" etc. literally are text, not specials:
            # only the EOS we append between documents may carry a special id.
            batch = tok.encode_batch(docs[i : i + _TOKENIZE_CHUNK], allow_special=False)
            flat = [t for seq in batch for t in (*seq, eos)]
            buf = np.asarray(flat, dtype=dtype).tobytes()
            f.write(buf)
            h.update(buf)
            ntok += len(flat)
            bar.update(len(batch))
    return {"tokens": ntok, "sha256": h.hexdigest()}


def build_corpus(
    manifest: Path | None,
    out: Path,
    cache: Path | None = None,
    max_mb: float | None = None,
    vocab_size: int | None = None,
    tokenizer: Path | None = None,
    find_links: Path | None = None,
    from_dir: Path | None = None,
    exclude: list[str] | None = None,
    split_by: str = "dir",
    val_frac: float = 0.1,
) -> dict:
    """Build the corpus described by `manifest` (None: configs/corpus/default.toml) into `out`; or,
    with `from_dir`, a user's own repository (data/local.py) tokenized with `tokenizer` (the model's
    tokenizer.json: the corpus then trains that model)."""
    started = time.monotonic()
    local = None
    if from_dir is not None:
        from .local import dir_sources

        if manifest is not None:
            raise UserError("--from-dir and --manifest are two different corpora; give one")
        if tokenizer is None:
            raise UserError("--from-dir needs the tokenizer of the model it will train (--model DIR, or --tokenizer)")
        local = dir_sources(from_dir, list(exclude or []), split_by, val_frac)
        from .manifest import CorpusManifest, CorpusSettings

        spec = CorpusManifest.model_construct(corpus=CorpusSettings(stdlib=False, val_packages=local[1]), package=[])
        manifest_path, manifest_sha = Path(from_dir), None
    else:
        manifest_path = Path(manifest) if manifest is not None else default_manifest_path()
        spec, manifest_sha = load_manifest(manifest_path)
    cfg = spec.corpus
    if max_mb is not None and max_mb <= 0:
        raise UserError(f"--max-mb {max_mb}: must be a positive number of megabytes")
    cap_mb = max_mb if max_mb is not None else cfg.max_mb
    cap = int(cap_mb * 1e6) if cap_mb is not None else None
    want_vocab = vocab_size if vocab_size is not None else cfg.vocab_size
    if tokenizer is None and not MIN_VOCAB <= want_vocab < 2**32:
        raise UserError(f"--vocab-size {want_vocab}: must be at least {MIN_VOCAB}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another --out")
    cache = Path(cache) if cache is not None else default_cache()
    find_links = Path(find_links) if find_links is not None else None
    if find_links is not None and not find_links.is_dir():
        raise UserError(f"{find_links}: find-links directory not found")
    if tokenizer is not None:
        given_tok = Tokenizer.from_file(tokenizer)  # validate before the long part
        given_text = Path(tokenizer).read_text(encoding="utf-8") if Path(tokenizer).is_file() \
            else (Path(tokenizer) / "tokenizer.json").read_text(encoding="utf-8")

    val = {canonical_name(v) for v in cfg.val_packages}
    tasks: list[Source | PackageSpec] = stdlib_sources() if cfg.stdlib else []
    missing = {v for v in val if v.startswith("stdlib")} - {canonical_name(t.name) for t in tasks}
    if missing:
        raise UserError(f"{manifest_path}: corpus.val_packages names {sorted(missing)[0]!r}, which "
                        "is not a stdlib package of this Python (or stdlib = false); fix the name")
    tasks += list(spec.package) if local is None else local[0]
    tasks = [t for t in tasks if _is_val(t.name, val)] + [t for t in tasks if not _is_val(t.name, val)]

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the old corpus is no longer valid from here on
    kept, records, skipped, dedup_info = _collect(tasks, cfg, val, cap, cache, find_links)
    kept.sort(key=lambda r: (r[0], r[1], r[2]))
    by_split = {s: [r for r in kept if r[0] == s] for s in SPLITS}
    if not by_split["val"]:
        log.warning("the validation split is empty: name kept packages in corpus.val_packages")
    if not by_split["train"]:
        raise UserError(f"{manifest_path}: no training files were kept (all packages were skipped, "
                        "filtered or held out); " + ("check --exclude and --val-frac" if local else
                                                     "add permissive packages or raise --max-mb"))

    for s in SPLITS:
        with atomic_open(out / "text" / f"{s}.jsonl", "w") as f:
            for _, pkg, path, text in by_split[s]:
                f.write(json.dumps({"package": pkg, "path": path, "text": text},
                                   ensure_ascii=False) + "\n")

    def docs(s: str) -> list[str]:
        return [document_text(p, q, t, cfg.doc_header) for _, p, q, t in by_split[s]]

    if tokenizer is not None:
        tok, tok_source = given_tok, "given"
        with atomic_open(out / "tokenizer.json", "w") as f:
            f.write(given_text)
    else:
        log.info("training a %d-token BPE on %d train documents", want_vocab, len(by_split["train"]))
        t0 = time.monotonic()
        tok, tok_source = train_tokenizer(docs("train"), want_vocab), "trained"
        tok.save(out / "tokenizer.json")
        log.info("tokenizer trained in %.1fs", time.monotonic() - t0)

    dtype = token_dtype(tok.vocab_size)
    splits = {}
    for s in SPLITS:
        d = docs(s)
        info = _tokenize_split(tok, d, out / f"{s}.bin", dtype, f"tokenize {s}")
        splits[s] = {
            "file": f"{s}.bin",
            "text": f"text/{s}.jsonl",
            "docs": len(d),
            "bytes": sum(len(x.encode("utf-8")) for x in d),
            "source_bytes": sum(len(r[3].encode("utf-8")) for r in by_split[s]),
            "tokens": info["tokens"],
            "sha256": info["sha256"],
        }

    totals: Counter = Counter()
    for rec in records:
        totals.update(rec["skipped"])
    meta = {
        "format": FORMAT,
        "python": platform.python_version(),
        "input_manifest": {"file": manifest_path.name, "sha256": manifest_sha} if local is None else
        {"from_dir": str(Path(from_dir).resolve()), "exclude": list(exclude or []), "split_by": split_by,
         "val_frac": val_frac, "val_units": local[1], "license": {"license": local[2].license,
                                                                 "note": local[2].reason}},
        "settings": {**cfg.model_dump(), "max_mb": cap_mb, "vocab_size": want_vocab},
        "tokenizer_sha256": file_sha256(out / "tokenizer.json"),
        "tokenizer_source": tok_source,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "byteorder": "little",
        "eos_id": tok.eos_id,
        "doc_header": cfg.doc_header,
        "splits": splits,
        "dedup": dedup_info,
        "skipped_files": dict(sorted(totals.items())),
        "packages": records,
        "skipped_packages": skipped,
    }
    with atomic_open(out / MANIFEST, "w") as f:
        f.write(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    log.info(
        "corpus %s: train %d docs %.1f MB %d tokens | val %d docs %.1f MB %d tokens | %.0fs",
        out, splits["train"]["docs"], splits["train"]["bytes"] / 1e6, splits["train"]["tokens"],
        splits["val"]["docs"], splits["val"]["bytes"] / 1e6, splits["val"]["tokens"],
        time.monotonic() - started,
    )
    return meta
