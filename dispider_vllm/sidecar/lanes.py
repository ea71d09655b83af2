"""Two CUDA streams for the sidecar's GPU work: what a closing clip waits on, and what nothing waits on yet.

A clip's decision latency runs from its last frame to its decision. With frames perceived as they arrive, about
half of the sidecar's GPU time goes to the CLIP tower over every stream's new frames, which no decision waits on
until their clip closes. On one CUDA stream a closing clip's pass queued behind those passes, and under load a
step's tower over the frames of the last ~150 ms came before its clips' passes. Here those passes go on a
low-priority stream that the host never waits on (the *background* lane), and a closing clip's last frames, its
pass and its decision on a high-priority one (the *urgent* lane): the GPU's block scheduler starts the urgent
kernels' blocks first (CUDA stream priorities), so a close no longer queues behind the frames' passes.

A frame's tokens made in the background are read by the urgent lane only after the event recorded at the end of
their pass, and their memory is marked in use by the urgent lane (``record_stream``) so the allocator does not
hand it back to the background lane before the urgent kernels reading it have run.

Measured on an H200 (docs/benchmarks.md, "Two lanes"), the lanes were no faster at the median and had a longer
tail than one stream: the close's own pass, not the frames' passes, is most of what a decision waits for. So they
are off by default (``dispider-serve --sidecar-lanes`` turns them on). ``DISPIDER_SIDECAR_LANES=0`` keeps them off.
On a CPU an engine asking for lanes splits its passes the same way, and both lanes are the current stream.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from concurrent.futures import Future

import torch

ENV_VAR = "DISPIDER_SIDECAR_LANES"


def lanes_enabled(requested: bool) -> bool:
    """Whether the engine splits its work into two lanes: when asked, unless ``DISPIDER_SIDECAR_LANES=0``."""
    return requested and os.environ.get(ENV_VAR, "1") != "0"


class GpuLanes:
    """``enabled``: the engine splits its frames' passes by lane; ``on_gpu``: the lanes are two CUDA streams (else
    both are the current stream, and the methods below are no-ops)."""

    def __init__(self, device: torch.device, enabled: bool = False) -> None:
        self.enabled = lanes_enabled(enabled)
        self.on_gpu = self.enabled and device.type == "cuda"
        self._urgent: torch.cuda.Stream | None = None
        self._background: torch.cuda.Stream | None = None
        # The Future of a frame's tokens -> the event recorded after the background pass that made them; an entry
        # goes when its frame does (a frame of a stream closed before its clip did is never read).
        self._made_by: weakref.WeakKeyDictionary[Future, torch.cuda.Event] = weakref.WeakKeyDictionary()
        if self.on_gpu:
            least, greatest = torch.cuda.Stream.priority_range()  # numerically: lower is more urgent
            self._urgent = torch.cuda.Stream(device, priority=greatest)
            self._background = torch.cuda.Stream(device, priority=least)
            torch.cuda.synchronize(device)  # the weights were put on the device by the default stream

    def urgent(self):
        """Run the block's device work on the urgent lane (the engine's commands and steps)."""
        return torch.cuda.stream(self._urgent) if self.on_gpu else nullcontext()

    @contextmanager
    def background(self, made: Iterable[Future]) -> Iterator[None]:
        """Run the block's device work on the background lane; ``made``: the Futures of the tokens it makes (set
        inside the block), which the urgent lane reads only once the block's kernels are done (``take``)."""
        if not self.on_gpu:
            yield
            return
        with torch.cuda.stream(self._background):
            yield
            done = torch.cuda.Event()
            done.record()
        for future in made:
            self._made_by[future] = done

    def take(self, futures: Iterable[Future]) -> None:
        """Before the urgent lane reads these frames' tokens (their Futures done): wait for the background passes
        that made them, and keep their memory from reuse until the urgent lane's work queued so far is done."""
        if not self.on_gpu:
            return
        waited: set[int] = set()
        for future in futures:
            done = self._made_by.pop(future, None)
            if done is None:  # made on the urgent lane itself
                continue
            if id(done) not in waited:
                self._urgent.wait_event(done)
                waited.add(id(done))
            future.result().record_stream(self._urgent)
