"""Exact and near-duplicate removal, first-come-first-kept.

Callers feed files in a fixed order (validation packages first, then training packages in
manifest order, paths sorted), so the result is deterministic and a training file that duplicates
a validation file is the one dropped: validation stays uncontaminated and keeps its copy.
"""
from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_MAX_HASH = np.uint64((1 << 32) - 1)
_SCHEME = "affine32"  # datasketch's bijective h -> a*h + b (mod 2^32) permutations
_CHUNK = 4096  # shingles per vectorised step; bounds the (chunk x perms) temporary


def normalise(text: str) -> str:
    """What counts as 'the same file': line ends, trailing spaces and blank edges ignored."""
    return "\n".join(ln.rstrip() for ln in text.splitlines()).strip("\n")


def exact_key(text: str) -> str:
    return hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of the distinct k-token shingles of the text (code tokens, not chars)."""
    toks = _TOKEN_RE.findall(text)
    if not toks:
        return np.zeros(0, dtype=np.uint32)
    th = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in toks), dtype=np.uint64, count=len(toks))
    k = min(k, len(th))
    n = len(th) - k + 1
    # A polynomial rolling combination of the token hashes; wraps in uint64 then keeps 32 bits.
    h = np.zeros(n, dtype=np.uint64)
    mult = np.uint64(1_000_003)
    with np.errstate(over="ignore"):
        for j in range(k):
            h = h * mult + th[j : j + n]
    return np.unique((h & _MAX_HASH).astype(np.uint32))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's finalizer: spreads every input bit over the high bits the minimum sees."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class Deduper:
    def __init__(self, threshold: float, num_perm: int, shingle: int, seed: int):
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle = shingle
        self.seed = seed
        self._perms = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME).permutations
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._sigs: dict[str, np.ndarray] = {}
        self._exact: dict[str, str] = {}
        self.counts = {"exact": 0, "near": 0}

    def minhash(self, text: str) -> MinHash:
        hv = shingle_hashes(text, self.shingle)
        a, b = self._perms
        sig = np.full(self.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
        # datasketch's affine32 update (fmix, then a*h + b wrapping in uint32), vectorised over
        # all shingles at once instead of one Python hash call per shingle.
        with np.errstate(over="ignore"):
            hv = _fmix32(hv)
            for i in range(0, len(hv), _CHUNK):
                phv = hv[i : i + _CHUNK, None] * a + b
                sig = np.minimum(sig, phv.min(axis=0))
        return MinHash(num_perm=self.num_perm, seed=self.seed, hashvalues=sig,
                       permutations=self._perms, scheme=_SCHEME)

    def add(self, key: str, text: str) -> tuple[str, str] | None:
        """Register a file. Returns None if it is new, else (kind, key of the copy kept earlier)."""
        ek = exact_key(text)
        if ek in self._exact:
            self.counts["exact"] += 1
            return "exact", self._exact[ek]
        m = self.minhash(text)
        # LSH finds candidates; confirm each with the estimated Jaccard so the threshold is real.
        for other in sorted(self._lsh.query(m)):
            if _jaccard(m.hashvalues, self._sigs[other]) >= self.threshold:
                self.counts["near"] += 1
                return "near", other
        self._exact[ek] = key
        self._lsh.insert(key, m)
        self._sigs[key] = m.hashvalues
        return None


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a == b)) / len(b)
