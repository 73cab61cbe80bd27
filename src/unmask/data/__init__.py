"""The code corpus: pinned sources -> license filter -> quality filters -> dedup -> split -> tokens."""
from .build import build_corpus, default_cache
from .manifest import CorpusManifest, default_manifest_path, load_manifest
from .shards import corpus_meta, document_text, load_split

__all__ = [
    "CorpusManifest",
    "build_corpus",
    "corpus_meta",
    "default_cache",
    "default_manifest_path",
    "document_text",
    "load_manifest",
    "load_split",
]
