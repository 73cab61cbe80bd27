"""A tiny corpus in the layout `unmask data build` writes, made without downloads, for trainer tests."""
from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np

from unmask.tokenizer import train_tokenizer

TRAIN_MODULES = ["textwrap.py", "heapq.py", "bisect.py", "shlex.py", "fnmatch.py"]
VAL_MODULES = ["colorsys.py", "keyword.py"]


def write_tiny_corpus(out: Path, vocab_size: int = 400) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = {s: [(stdlib / m).read_text() for m in mods] for s, mods in (("train", TRAIN_MODULES), ("val", VAL_MODULES))}
    tok = train_tokenizer(texts["train"], vocab_size)
    tok.save(out / "tokenizer.json")
    splits = {}
    for split, docs in texts.items():
        ids = []
        for d in docs:
            ids += tok.encode(d) + [tok.eos_id]
        arr = np.asarray(ids, dtype=np.uint16)
        arr.tofile(out / f"{split}.bin")
        splits[split] = {"docs": len(docs), "bytes": sum(len(d.encode()) for d in docs), "tokens": len(ids),
                         "sha256": hashlib.sha256(arr.tobytes()).hexdigest(), "file": f"{split}.bin"}
    (out / "manifest.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": tok.vocab_size, "splits": splits}))
    return out
