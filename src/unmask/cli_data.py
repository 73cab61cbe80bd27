"""`unmask data build` and `unmask tokenizer train`: the commands that make training data. Like the
other command modules, nothing heavy is imported before a command runs."""
from __future__ import annotations

from pathlib import Path

from .cli_train import positive_int as _positive_int
from .errors import UserError


def cmd_data_build(a) -> None:
    from .data import build_corpus

    tokenizer = a.tokenizer
    if a.from_dir is not None and tokenizer is None:  # the corpus trains this model: its tokenizer
        from .pretrained import default_model_dir
        tokenizer = (Path(a.model) if a.model else default_model_dir()) / "tokenizer.json"
        if not tokenizer.is_file():
            raise UserError(f"--model {a.model}: no tokenizer.json there; give the model directory the corpus will train")
    m = build_corpus(a.manifest, Path(a.out), cache=a.cache, max_mb=a.max_mb, vocab_size=a.vocab_size,
                     tokenizer=tokenizer, find_links=a.find_links, from_dir=a.from_dir, exclude=a.exclude,
                     split_by=a.split_by, val_frac=a.val_frac)
    s = m["splits"]
    print(f"corpus written to {a.out}: train {s['train']['tokens']:,} tokens ({s['train']['bytes'] / 1e6:.1f} MB), "
          f"val {s['val']['tokens']:,} tokens ({s['val']['bytes'] / 1e6:.1f} MB)")


def cmd_tokenizer_train(a) -> None:
    from .tokenizer import train_from_corpus

    train_from_corpus(Path(a.corpus), Path(a.out), vocab_size=a.vocab_size)
    print(f"tokenizer written to {Path(a.out) / 'tokenizer.json'}")


def add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="code corpus").add_subparsers(dest="data_command", required=True)
    b = data.add_parser("build", help="download, license-filter, dedup, split and tokenize the code corpus")
    b.add_argument("--manifest", type=Path, default=None, help="pinned corpus manifest (default: configs/corpus/default.toml)")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--cache", type=Path, default=None, help="where downloaded packages are kept")
    b.add_argument("--max-mb", type=float, default=None, help="cap on total source size in MB")
    b.add_argument("--vocab-size", type=_positive_int, default=None)
    b.add_argument("--tokenizer", type=Path, default=None, help="use this tokenizer.json instead of training one")
    b.add_argument("--find-links", type=Path, default=None, help="install packages from this local directory only")
    b.add_argument("--from-dir", type=Path, default=None, help="your own repository instead of the manifest's packages")
    b.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="--from-dir: leave out paths matching GLOB")
    b.add_argument("--split-by", choices=("dir", "file"), default="dir",
                   help="--from-dir: hold out whole top-level directories (dir) or single files (file)")
    b.add_argument("--val-frac", type=float, default=0.1, help="--from-dir: share of the units held out for validation")
    b.add_argument("--model", default=None, help="--from-dir: the model the corpus will train; its tokenizer is used "
                                                 "(default: the embedded model)")
    b.set_defaults(func=cmd_data_build)

    tk = sub.add_parser("tokenizer", help="tokenizer").add_subparsers(dest="tok_command", required=True)
    t = tk.add_parser("train", help="train the byte-level BPE on a built corpus")
    t.add_argument("--corpus", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=_positive_int, default=8192)
    t.set_defaults(func=cmd_tokenizer_train)

