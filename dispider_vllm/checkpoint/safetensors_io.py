"""Safetensors reading by header only, tensor-at-a-time loading, and a streaming writer.

Nothing here holds more than one tensor: headers give names, shapes and dtypes without loading data, and
the writer lays out the whole header first, so tensor bytes can follow one by one.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_FILE_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"

DTYPE_SIZES = {
    "F64": 8, "I64": 8, "U64": 8,
    "F32": 4, "I32": 4, "U32": 4,
    "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorSource:
    """Where one tensor lives: its file, its name in that file, its shape and safetensors dtype."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class WeightFiles:
    """The tensors of one checkpoint directory, and the file that lists them (index or single file)."""

    listing: Path
    tensors: dict[str, TensorSource]
    files: tuple[Path, ...]


def _read_headers(path: Path, keys: Iterable[str] | None) -> dict[str, TensorSource]:
    """Shapes and dtypes of ``keys`` (all keys when None) in one file, without loading any tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            present = set(handle.keys())
            wanted = sorted(present) if keys is None else list(keys)
            found = {}
            for key in wanted:
                if key not in present:
                    raise CheckpointError(path, key, "tensor listed in the index is not in this shard")
                piece = handle.get_slice(key)
                found[key] = TensorSource(path, key, tuple(piece.get_shape()), piece.get_dtype())
            return found
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(path, None, f"not a readable safetensors file: {exc}") from exc


def read_weight_files(directory: Path) -> WeightFiles:
    """All tensors of a HF-style checkpoint directory: sharded with an index, or one model.safetensors."""
    index_file = directory / INDEX_FILE_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(index_file, "weight_map", f"unreadable index: {exc}") from exc
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        tensors: dict[str, TensorSource] = {}
        for shard, keys in sorted(by_shard.items()):
            shard_path = directory / shard
            if not shard_path.is_file():
                raise CheckpointError(index_file, keys[0], f"names shard {shard!r}, which is absent")
            tensors.update(_read_headers(shard_path, keys))
        files = tuple(directory / shard for shard in sorted(by_shard))
        return WeightFiles(index_file, tensors, files)
    single = directory / SINGLE_FILE_NAME
    if single.is_file():
        return WeightFiles(single, _read_headers(single, None), (single,))
    if any(directory.glob("pytorch_model*.bin")):
        raise CheckpointError(directory, None, "holds pytorch_model*.bin weights; only safetensors are supported")
    raise CheckpointError(index_file, None, f"no weights: neither {INDEX_FILE_NAME} nor {SINGLE_FILE_NAME}")


def _load_tensor(handle, key: str) -> torch.Tensor:
    """The single place a tensor is loaded (tests wrap it to count live tensors)."""
    return handle.get_tensor(key)


def iter_tensors(plan: Iterable[tuple[str, TensorSource]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for each planned source, loading one tensor at a time.

    The caller should drop each tensor before asking for the next one to keep memory at one tensor.
    """
    from safetensors import safe_open

    with ExitStack() as stack:
        handles: dict[Path, object] = {}
        for name, source in plan:
            if source.file not in handles:
                handles[source.file] = stack.enter_context(safe_open(str(source.file), framework="pt"))
            tensor = _load_tensor(handles[source.file], source.key)
            yield name, tensor
            del tensor  # before the next load: only one tensor alive at a time


def _torch_dtype_name(tensor: torch.Tensor) -> str:
    import torch

    names = {
        torch.float64: "F64", torch.int64: "I64", torch.float32: "F32", torch.int32: "I32",
        torch.float16: "F16", torch.bfloat16: "BF16", torch.int16: "I16", torch.int8: "I8",
        torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    }  # fmt: skip
    return names[tensor.dtype]


def _header_bytes(specs: list[tuple[str, TensorSource]], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, source in specs:
        header[name] = {"dtype": source.dtype, "shape": list(source.shape), "data_offsets": [offset, offset + source.nbytes]}
        offset += source.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(encoded)) + encoded


def write_safetensors_streaming(
    path: Path,
    specs: list[tuple[str, TensorSource]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write one safetensors file from a stream of tensors that arrive in the order of ``specs``.

    The header comes from the specs (names, shapes, dtypes), so each tensor is written and dropped as it
    arrives. Returns the number of data bytes written.
    """
    import torch

    written = 0
    pending = iter(specs)
    with open(path, "wb") as out:
        out.write(_header_bytes(specs, metadata or {"format": "pt"}))
        # A plain loop, not zip(): zip keeps its previous items alive until the next ones are loaded.
        for got_name, tensor in tensors:
            name, spec = next(pending, (None, None))
            if spec is None or got_name != name:
                raise ValueError(f"{path}: tensor {got_name!r} arrived out of the planned order")
            if tuple(tensor.shape) != spec.shape or _torch_dtype_name(tensor) != spec.dtype:
                raise CheckpointError(spec.file, spec.key, f"tensor does not match its header entry {name!r}")
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            out.write(memoryview(data))
            written += data.nbytes
            del tensor, data  # before the next tensor is loaded
    if next(pending, None) is not None:
        raise ValueError(f"{path}: fewer tensors arrived than planned")
    return written
