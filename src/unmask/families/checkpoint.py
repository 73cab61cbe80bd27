"""Lazy, tensor-by-tensor reading of a safetensors checkpoint (one file, or shards with an index).

Nothing is read at open beyond the headers: each `get` memory-maps one tensor out of its shard, so a
loader that converts and keeps tensors one at a time never holds a second copy of the model.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointReader:
    """The tensors of a checkpoint directory, by name. Use as a context manager (it closes the shards).

    Every `get` marks the name as used; `unused()` then lists what the checkpoint holds that the model
    did not ask for (a sign that config.json and the weights disagree).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._stack = ExitStack()
        self._files: dict[str, object] = {}  # shard file name -> open safe_open handle
        self._where: dict[str, str] = {}  # tensor name -> shard file name
        self._used: set[str] = set()
        self._ignored: set[str] = set()
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        index = self.path / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index}: corrupt shard index (no weight_map); re-download the checkpoint") from None
            shards = sorted(set(weight_map.values()))
        elif (self.path / SINGLE).exists():
            weight_map, shards = None, [SINGLE]
        else:
            raise UserError(f"{self.path}: no {SINGLE} or {INDEX}; is this a checkpoint directory?")
        for name in shards:
            f = self.path / name
            if not f.exists():
                raise UserError(f"{f}: shard listed in {INDEX} is missing; re-download the checkpoint")
            try:
                handle = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{f}: truncated or corrupt safetensors file ({e}); re-download it") from None
            self._files[name] = handle
            for key in handle.keys():
                self._where.setdefault(key, name)
        if weight_map is not None:
            for key, name in weight_map.items():
                if self._where.get(key) != name:
                    raise UserError(f"{self.path / name}: tensor {key} listed in {INDEX} is not in this shard; "
                                    "the checkpoint is incomplete or corrupt, re-download it")

    # ---- lookups ----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self.path / self._where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        self._require(name)
        return tuple(self._files[self._where[name]].get_slice(name).get_shape())

    def get(self, name: str, shape: tuple[int, ...] | torch.Size | None = None) -> torch.Tensor:
        """The tensor `name` in its stored dtype on the CPU; with `shape`, checked against it first
        (a mismatch is a one-line UserError naming the file, the tensor and both shapes)."""
        self._require(name)
        if shape is not None:
            self.check_shape(name, tuple(shape))
        self._used.add(name)
        try:
            return self._files[self._where[name]].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{self.file_of(name)}: cannot read tensor {name} ({e}); re-download the file") from None

    def check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        got = self.shape(name)
        if got != tuple(shape):
            raise UserError(f"{self.file_of(name)}: tensor {name} has shape {got} but config.json implies "
                            f"{tuple(shape)}; config.json does not match the weights")

    def ignore(self, name: str) -> None:
        """Allow `name` to stay unread (e.g. a head stored although the config ties it)."""
        self._ignored.add(name)

    def unused(self) -> list[str]:
        return sorted(set(self._where) - self._used - self._ignored)

    def _require(self, name: str) -> None:
        if name not in self._where:
            raise UserError(f"{self.path}: tensor {name} is missing from the checkpoint but config.json "
                            "implies it; config.json does not match the weights (or the download is incomplete)")

    # ---- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
