"""GGUF files read into our Transformer, dequantised tensor by tensor: `load_gguf`, `find_gguf`,
`read_metadata`.

The reader memory-maps the file (gguf.GGUFReader) and each tensor is dequantised on its own
(`gguf.quants.dequantize`: F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, the K-quants Q2_K..Q6_K, the IQ
types, TQ1_0/TQ2_0, MXFP4; F64 here), then converted to the requested dtype and device, so the model
is never held twice. A type the gguf package cannot dequantise (Q8_1, Q8_K, integers) is a one-line
UserError naming the file, the tensor and the supported types. Peak memory while loading is the model
in `dtype` plus one tensor dequantised to float32.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import UserError
from ..load import _check_memory, cast, estimate_bytes, install, meta_network
from .config import gguf_config
from .layout import _IGNORED, NAMES, _heads_of, _unpermute, import_gguf
from .tokenizer import gguf_tokenizer

SUFFIX = ".gguf"


def find_gguf(path: str | os.PathLike) -> Path | None:
    """The GGUF file `path` names: `path` itself when it ends in .gguf, or the only .gguf in a
    directory that has no config.json; None when `path` is something else (a checkpoint directory).
    A directory without config.json holding several .gguf files is a UserError."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX and not path.is_dir():
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        raise UserError(f"{path}: holds {len(found)} .gguf files ({', '.join(p.name for p in found[:3])}"
                        f"{', ...' if len(found) > 3 else ''}); pass the one to load")
    return found[0] if found else None


def _open(file: Path):
    gguf = import_gguf()
    if not file.is_file():
        raise UserError(f"{file}: GGUF file not found")
    try:
        return gguf.GGUFReader(file, "r")
    except (ValueError, KeyError, IndexError, TypeError, OSError, EOFError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{file}: truncated or corrupt GGUF file ({msg}); re-download it") from None


def read_metadata(reader, file: str | os.PathLike = "GGUF file") -> dict[str, Any]:
    """The key/value metadata of an open GGUFReader as Python values (header fields left out)."""
    out = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            out[name] = field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as e:
            raise UserError(f"{file}: metadata key {name} is corrupt ({e}); re-download the file") from None
    return out


# ---- tensors -----------------------------------------------------------------------------------
def _dequantizable() -> list[str]:
    gguf = import_gguf()
    traits = getattr(gguf.quants, "_type_traits", {})
    q = gguf.GGMLQuantizationType
    return [t.name for t in q if t in (q.F32, q.F16, q.F64) or t in traits]


class _Tensors:
    """The tensors of a GGUF file by name, dequantised one at a time to float32 torch tensors."""

    def __init__(self, reader, file: Path):
        self.file = file
        self.by_name = {t.name: t for t in reader.tensors}
        self.used: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical shape, PyTorch order (GGUF stores ggml's reversed `ne`)."""
        return tuple(int(d) for d in reversed(self.by_name[name].shape.tolist()))

    def check_types(self, names: Iterable[str]) -> None:
        ok = set(_dequantizable())
        for name in names:
            t = self.by_name[name]
            if t.tensor_type.name not in ok:
                raise UserError(f"{self.file}: tensor {name} is stored as {t.tensor_type.name}, which unmask cannot "
                                f"dequantize; supported: {', '.join(sorted(ok))}")

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self.by_name:
            raise UserError(f"{self.file}: tensor {name} is missing but the GGUF metadata implies it; the file "
                            "is incomplete or its metadata does not match its tensors")
        got = self.shape(name)
        if got != tuple(shape):
            raise UserError(f"{self.file}: tensor {name} has shape {got} but the GGUF metadata implies "
                            f"{tuple(shape)}; the metadata does not match the tensors")
        gguf = import_gguf()
        t = self.by_name[name]
        q = gguf.GGMLQuantizationType
        try:
            if t.tensor_type == q.F32:
                arr = np.array(t.data, dtype=np.float32)  # a copy: the mapping is read-only
            elif t.tensor_type == q.F64:
                arr = np.asarray(t.data, dtype=np.float32)
            else:
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(f"{self.file}: tensor {name} is stored as {t.tensor_type.name}, which unmask cannot "
                            f"dequantize; supported: {', '.join(sorted(_dequantizable()))}") from None
        except (ValueError, OSError) as e:
            raise UserError(f"{self.file}: cannot read tensor {name} ({e}); the file is truncated or corrupt, "
                            "re-download it") from None
        self.used.add(name)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).reshape(got))


def load_gguf(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a GGUF file (or the only .gguf of a directory without config.json).

    Returns (net in eval mode on `device` in `dtype`, its ModelConfig, the FamilySpec, an HFTokenizer,
    the metadata as a dict without the vocabulary-sized arrays: tokenizer.ggml.tokens, token_type,
    merges and scores). Anything wrong with the file is a one-line UserError naming it.
    """
    device = torch.device(device)
    file = find_gguf(path)
    if file is None:
        raise UserError(f"{path}: not a .gguf file, nor a directory holding one .gguf and no config.json")
    reader = _open(file)
    meta = read_metadata(reader, file)
    tensors = _Tensors(reader, file)
    cfg, spec, permuted = gguf_config(meta, tensors, file)
    net, shapes = meta_network(cfg)
    wanted = {ours: NAMES.to_hf(ours) for ours in shapes}
    missing = [n for n in wanted.values() if n not in tensors]
    if missing:
        raise UserError(f"{file}: tensor {missing[0]} is missing but the GGUF metadata implies it; the file is "
                        "incomplete or its metadata does not match its tensors")
    extra = sorted(n for n in tensors.by_name if n not in wanted.values() and not n.endswith(_IGNORED))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"{file}: unexpected tensor {extra[0]}{more} that the metadata does not account for "
                        f"(architecture {meta.get('general.architecture')!r} as unmask reads it)")
    tensors.check_types(wanted.values())
    _check_memory(file, estimate_bytes(cfg, shapes, dtype), device)
    state: dict[str, torch.Tensor] = {}
    for ours, shape in shapes.items():
        t = tensors.get(wanted[ours], tuple(shape))
        heads = _heads_of(ours, cfg) if permuted else None
        if heads is not None:
            t = _unpermute(t, heads)
        state[ours] = cast(ours, t, dtype, device)
        del t
    net = install(net, cfg, state, device)
    tok = gguf_tokenizer(meta, file, cfg, spec)
    big = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
    return net, cfg, spec, tok, {k: v for k, v in meta.items() if k not in big}
