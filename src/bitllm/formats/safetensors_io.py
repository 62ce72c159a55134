"""Validated safetensors reading and (sharded, atomic-directory) writing.

Every reader error becomes a FormatError naming the file, the tensor and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path, PureWindowsPath
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from bitllm.errors import FormatError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def _inside(name: str) -> bool:
    """Whether a shard name from an index is a relative path that stays in its directory (no absolute
    path, drive or `..`, with either separator). Lexical on purpose: the hub cache's shards are
    symlinks into its blob store, which must still load."""
    parts = name.replace("\\", "/").split("/")
    return bool(name) and parts[0] != "" and not PureWindowsPath(name).drive and ".." not in parts


class CheckpointReader:
    """Read tensors from `model.safetensors` or a sharded set listed in `model.safetensors.index.json`."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._where: dict[str, Path] = {}
        self._metadata: dict[Path, dict[str, str]] = {}
        index = self.directory / INDEX
        single = self.directory / SINGLE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FormatError(f"{index}: not a valid safetensors index ({e})") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise FormatError(f"{index}: weight_map must map tensor names to shard file names")
            outside = next((f for f in weight_map.values() if not _inside(f)), None)
            if outside is not None:
                raise FormatError(f"{index}: shard {outside!r} is not a file inside the model directory; refusing to read it")
            files = sorted({self.directory / f for f in weight_map.values()})
        elif single.exists():
            files = [single]
        else:
            raise FormatError(f"{self.directory}: no {SINGLE} or {INDEX} found")
        for f in files:
            keys, meta = self._open_header(f)
            self._metadata[f] = meta
            for k in keys:
                self._where[k] = f
        if index.exists():
            missing = sorted(set(weight_map) - set(self._where))
            if missing:
                raise FormatError(f"{index}: lists tensors absent from the shards, e.g. {missing[:3]}")

    @staticmethod
    def _open_header(f: Path) -> tuple[list[str], dict[str, str]]:
        if not f.exists():
            raise FormatError(f"{f}: file listed by the checkpoint is missing")
        try:
            with safe_open(f, framework="pt") as h:
                return list(h.keys()), dict(h.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"{f}: corrupt or truncated safetensors file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def metadata(self) -> dict[str, str]:
        """Metadata of the first file (every file bitllm writes carries the same)."""
        return next(iter(self._metadata.values()), {})

    def all_metadata(self) -> dict[Path, dict[str, str]]:
        return dict(self._metadata)

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def get(self, key: str, *, dtype: Iterable[torch.dtype] | None = None, shape: tuple[int, ...] | None = None,
            finite: bool = True) -> torch.Tensor:
        """Load one tensor, checking its dtype, shape and (for floats) that it holds no NaN/inf."""
        if key not in self._where:
            raise FormatError(f"{self.directory}: tensor {key!r} is missing")
        f = self._where[key]
        try:
            with safe_open(f, framework="pt") as h:
                t = h.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"{f}: tensor {key!r} cannot be read ({e})") from None
        if dtype is not None and t.dtype not in tuple(dtype):
            raise FormatError(f"{f}: tensor {key!r} has dtype {t.dtype}, expected one of {[str(d) for d in dtype]}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise FormatError(f"{f}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if finite and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise FormatError(f"{f}: tensor {key!r} holds {bad} NaN/inf value(s)")
        return t


def write_checkpoint_tensors(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                             max_shard_bytes: int) -> list[Path]:
    """Write tensors as one file or HF-style shards plus an index. `directory` is a temp dir."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.contiguous()
        size += nbytes
    if len(shards) == 1:
        path = directory / SINGLE
        save_file(shards[0], str(path), metadata=metadata)
        return [path]
    paths = []
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / name), metadata=metadata)
        weight_map.update({k: name for k in shard})
        paths.append(directory / name)
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths
