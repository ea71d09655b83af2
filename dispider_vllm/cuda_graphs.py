"""CUDA graphs for the sidecar's small fixed-shape passes: capture once per shape bucket, then replay.

A step of one to a few clips costs the host more than the GPU: each of the hundreds of kernels of a CLIP tower or
a 28-layer decision forward is launched from Python. A captured CUDA graph launches them all at once. As vLLM does
for decode, callers pad a small batch up to a fixed "bucket" shape (:class:`StaticShapes`), copy it into static
input buffers, and replay the graph captured for that bucket.

:class:`GraphCache` keeps one graph per shape key:

- ``inputs(key, allocate)`` gives the key's static input buffers (allocated once; the caller copies into them).
- ``run(key, fn)`` runs ``fn(inputs)``: on CUDA, captured on the key's first use (warm-up runs on a side stream,
  then ``torch.cuda.graph`` into one memory pool shared by every capture of the cache) and replayed afterwards; on
  any other device, or with graphs off, it is simply called, so the same padded code runs eagerly (the CPU tests).
- The outputs a replay returns are the graph's static tensors, overwritten by the next replay of *any* graph of
  the cache (they share the pool): consume or copy them first (a copy queued on the same stream is enough).
- A graph bakes in the addresses of every tensor it reads or writes. ``bind(*tensors)`` drops all graphs when a
  tensor that the graphs use but do not own has moved (a grown KV pool, a regrown RoPE table); ``clear()`` drops
  them unconditionally.

``DISPIDER_CUDA_GRAPHS=0`` turns the graph (padded) paths off for models built after it is set, as
``DISPIDER_FUSED_OPS=0`` does for the fused kernels (:func:`cuda_graphs_enabled`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

ENV_VAR = "DISPIDER_CUDA_GRAPHS"

Inputs = dict[str, torch.Tensor]
Output = TypeVar("Output")


def cuda_graphs_enabled(requested: bool = True) -> bool:
    """Whether a model asking for the graph paths gets them: not when ``DISPIDER_CUDA_GRAPHS=0``."""
    return requested and os.environ.get(ENV_VAR, "1") != "0"


@dataclass(frozen=True)
class StaticShapes:
    """Bucket shapes of a graphed pass: batch sizes 1, 2, 4, ... up to ``max_batch`` (itself a bucket), lengths
    rounded up to a multiple of ``length_multiple`` up to ``max_length``. Anything larger is no graph's business."""

    max_batch: int
    length_multiple: int = 32
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.max_batch < 0 or self.length_multiple < 1 or self.max_length < 1:
            raise ValueError(f"invalid graph buckets: {self}")

    def batch(self, size: int) -> int | None:
        """The smallest batch bucket holding ``size`` rows, or None when it exceeds ``max_batch``."""
        if not 1 <= size <= self.max_batch:
            return None
        return min(1 << (size - 1).bit_length(), self.max_batch)

    def batch_buckets(self) -> list[int]:
        """Every batch bucket, smallest first (none when graphs are off)."""
        return sorted({self.batch(size) for size in range(1, self.max_batch + 1)})

    def length_buckets(self) -> list[int]:
        """Every length bucket, shortest first."""
        return list(range(self.length_multiple, self.max_length + 1, self.length_multiple))

    def length(self, size: int) -> int | None:
        """``size`` rounded up to the length multiple, or None when that exceeds ``max_length``."""
        rounded = -(-size // self.length_multiple) * self.length_multiple
        return rounded if 1 <= size and rounded <= self.max_length else None


@dataclass
class GraphStats:
    captures: int = 0  # graphs captured (each after its warm-up runs)
    replays: int = 0  # graph replays
    eager_runs: int = 0  # padded passes run eagerly (not CUDA, or graphs off)
    clears: int = 0  # times every graph was dropped (clear(), or bind() seeing a moved tensor)


@dataclass
class _Entry:
    inputs: Inputs
    graph: torch.cuda.CUDAGraph | None = None
    outputs: Any = None


class GraphCache:
    """Captured graphs keyed by shape; see the module docstring."""

    def __init__(self, device: torch.device | str, *, enabled: bool = True, warmup_runs: int = 2):
        self.device = torch.device(device)
        self.graphed = enabled and self.device.type == "cuda"
        self.warmup_runs = warmup_runs
        self.stats = GraphStats()
        self._entries: dict[Hashable, _Entry] = {}
        self._bound: tuple[tuple[int, tuple[int, ...]], ...] = ()
        self._pool: Any = None  # one private memory pool for all captures, made at the first

    def __len__(self) -> int:
        """Graphs captured and alive."""
        return sum(entry.graph is not None for entry in self._entries.values())

    def inputs(self, key: Hashable, allocate: Callable[[], Inputs]) -> Inputs:
        """The static input buffers of ``key``, allocated by ``allocate()`` on first use."""
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(inputs=allocate())
        return entry.inputs

    def run(self, key: Hashable, fn: Callable[[Inputs], Output]) -> Output:
        """``fn(inputs of key)``, replayed from a graph where capturing; see the module docstring."""
        entry = self._entries[key]
        if not self.graphed:
            self.stats.eager_runs += 1
            return fn(entry.inputs)
        if entry.graph is None:
            self._capture(entry, fn)
        entry.graph.replay()
        self.stats.replays += 1
        return entry.outputs

    def bind(self, *tensors: torch.Tensor) -> None:
        """Drop every graph if any of ``tensors`` (used by the graphs, owned elsewhere) moved or changed shape."""
        bound = tuple((t.data_ptr(), tuple(t.shape)) for t in tensors)
        if bound != self._bound:
            if self._entries:
                self.clear()
            self._bound = bound

    def clear(self) -> None:
        """Drop every graph and static buffer; the next run of each key captures again."""
        self._entries.clear()
        self._pool = None  # a fresh pool: the old one is freed with its graphs
        self.stats.clears += 1

    def _capture(self, entry: _Entry, fn: Callable[[Inputs], Any]) -> None:
        # Warm-up on a side stream, as torch asks: lazy initialisations (cuBLAS workspaces, autotuning) must not
        # happen during capture. The warm-up runs compute the same thing the graph will, so their writes are harmless.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                fn(entry.inputs)
        current.wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the sidecar's preprocessing threads may touch CUDA (pinned memory) during a capture.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            outputs = fn(entry.inputs)
        entry.graph, entry.outputs = graph, outputs
        self.stats.captures += 1


def copy_from_host(static: torch.Tensor, host: torch.Tensor) -> None:
    """Copy a host tensor into a static buffer; to a GPU through pinned memory, without waiting for the device."""
    if static.device.type == "cuda":
        host = host.pin_memory()
    static.copy_(host, non_blocking=static.device.type == "cuda")
