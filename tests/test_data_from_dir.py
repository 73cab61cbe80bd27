"""`unmask data build --from-dir`: a user's repository becomes a corpus with the same filters and dedup,
a license report, a validation split by top-level directory or by file, the model's own tokenizer,
and it trains that model on (continued pretraining with `init_from`); bad input is one line, exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from corpus_util import write_tiny_corpus
from test_train import losses, run_cli, write_config
from unmask.data import build_corpus

pytestmark = pytest.mark.timeout(300)
BODY = "def f{i}(x):\n    y = x + {i}\n    return y * 2\n\n\nclass C{i}:\n    value = {i}\n"


def make_repo(root: Path) -> Path:
    files = {
        "pkg_a/core.py": BODY.format(i=1), "pkg_a/util.py": BODY.format(i=2),
        "pkg_a/sub/deep.py": BODY.format(i=3), "pkg_b/main.py": BODY.format(i=4),
        "pkg_c/more.py": BODY.format(i=5), "pkg_d/other.py": BODY.format(i=6),
        "setup.py": BODY.format(i=7), "pkg_b/copy.py": BODY.format(i=4),  # an exact duplicate
        "pkg_b/empty.py": "x = 1\n",  # near-empty
        "tools/gen.py": BODY.format(i=8),  # excluded below
        ".git/hooks/h.py": BODY.format(i=9), "node_modules/n.py": BODY.format(i=10), ".venv/v.py": BODY.format(i=11),
        "README.md": "# not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "LICENSE").write_text("MIT License\n\nPermission is hereby granted, free of charge, to any person ...\n")
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny trained block model (its tokenizer is what the repository's corpus is built with)."""
    from unmask.train import trainer

    d = tmp_path_factory.mktemp("base")
    corpus = write_tiny_corpus(d / "corpus")
    return trainer.train(write_config(d / "a.toml", corpus, "bd3lm", steps=2), d / "run")


def texts(out: Path, split: str) -> dict[str, str]:
    return {r["path"]: r["text"] for r in map(json.loads, (out / "text" / f"{split}.jsonl").read_text().splitlines())}


def test_split_by_dir(tmp_path, base):
    repo = make_repo(tmp_path / "repo")
    out = tmp_path / "c"
    meta = build_corpus(None, out, tokenizer=base / "tokenizer.json", from_dir=repo, exclude=["tools/*"], val_frac=0.3)
    train, val = texts(out, "train"), texts(out, "val")
    kept = set(train) | set(val)
    assert not any(p.startswith(("tools/", ".git/", "node_modules/", ".venv/")) for p in kept)
    assert "pkg_b/empty.py" not in kept and not ({"pkg_b/copy.py", "pkg_b/main.py"} <= kept)  # filters and dedup
    units = meta["input_manifest"]["val_units"]
    assert units and all(any(p == u or p.startswith(u + "/") or (u == "." and "/" not in p) for u in units) for p in val)
    assert not any(p.split("/")[0] in units for p in train if "/" in p)  # whole directories held out
    assert meta["tokenizer_source"] == "given" and meta["skipped_files"]["near_empty"] == 1
    assert meta["input_manifest"]["license"]["license"] == "MIT License"
    assert meta["dedup"]["exact"] >= 1
    # the bins hold the model's tokenization of the texts (its tokenizer.json copied beside them)
    assert (out / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert np.fromfile(out / "train.bin", dtype=meta["dtype"]).size == meta["splits"]["train"]["tokens"]
    # deterministic: the same directory gives the same bytes
    again = build_corpus(None, tmp_path / "c2", tokenizer=base / "tokenizer.json", from_dir=repo, exclude=["tools/*"],
                         val_frac=0.3)
    assert again["splits"] == meta["splits"]


def test_split_by_file(tmp_path, base):
    repo = make_repo(tmp_path / "repo")
    meta = build_corpus(None, tmp_path / "c", tokenizer=base / "tokenizer.json", from_dir=repo, split_by="file",
                        val_frac=0.5)
    val = set(texts(tmp_path / "c", "val"))
    assert val and set(meta["input_manifest"]["val_units"]) >= val
    assert "tools/gen.py" in set(texts(tmp_path / "c", "train")) | val  # no --exclude this time


def test_continued_pretraining_on_it(tmp_path, base):
    """The whole path: build from the repository with the model's tokenizer, train from its weights."""
    repo = make_repo(tmp_path / "repo")
    r = run_cli("data", "build", "--from-dir", str(repo), "--out", str(tmp_path / "c"), "--model", str(base),
                "--val-frac", "0.3")
    assert r.returncode == 0, r.stderr
    cfg = write_config(tmp_path / "t.toml", tmp_path / "c", "bd3lm", steps=3, extra=f'init_from = "{base}"')
    r = run_cli("train", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert len(losses(tmp_path / "run")) == 3
    evals = [x for x in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "eval_bpb" in x]
    assert evals and np.isfinite(evals[-1]["eval_bpb"])


@pytest.mark.parametrize("args, says", [
    (["--from-dir", "{missing}"], "not a directory"),
    (["--from-dir", "{empty}"], "no Python source files found"),
    (["--from-dir", "{repo}", "--exclude", "*"], "no Python source files found (after --exclude *)"),
    (["--from-dir", "{repo}", "--model", "{empty}"], "no tokenizer.json there"),
    (["--from-dir", "{repo}", "--manifest", "x.toml"], "--from-dir and --manifest"),
])
def test_bad_input_is_one_line(tmp_path, base, args, says):
    repo = make_repo(tmp_path / "repo")
    (tmp_path / "empty").mkdir()
    fill = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "repo": repo}
    r = run_cli("data", "build", "--out", str(tmp_path / "c"), *[a.format(**fill) for a in args])
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
