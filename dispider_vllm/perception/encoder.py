"""Perception: clips -> (raw, M, T), batched over the clips of many streams (DISPIDER.md section 2).

Per clip:
  1. CLIP tower on its 16 frames; hidden state at ``select_layer`` (LLaVA's ``hidden_states`` index, 0 being the
     embeddings), CLS dropped -> [16, 256, C].
  2. 2x2 neighbour merge per frame -> 8x8 tokens of 4C channels (TL, TR, BL, BR), frame-major -> raw [1024, 4C].
  3. Pool projector: per frame a 2x2 grid of means over 4x4 merged tokens (64 tokens), one global mean over all
     1024 (1 token); the MLP over all 1089 tokens.
  4. First pass of the compact LLM over ``This contains a clip sampled in {s} to {e} seconds<image>`` with the 1089
     projected tokens at ``<image>``: plain causal, positions from 0. M = the 64 pooled positions, T = the global one.

A chunk of at most ``max_graph_clips`` clips (a sidecar step under live load: one to a few) runs all four as one
static-shape pass instead, replayed from a CUDA graph on a GPU (:mod:`dispider_vllm.cuda_graphs`): the clips are
padded to 1, 2, 4, ... clips, the sequences right-padded to a multiple of 32 tokens. The time prompt's length varies
by a few tokens between clips, so the text goes in as token ids and the image's start as an index: the graph looks
the text up, puts the projected tokens at each clip's start, and gathers M and T from there. Larger chunks stay
eager (their launch overhead is spread over many clips), pipelined as below.

Clips may come preprocessed (float32 pixels) or as their frames (uint8 [16, H, W, 3], ``Clip.preprocessed``
False): the encoder then copies the uint8 frames to its device and preprocesses them there
(:func:`~dispider_vllm.perception.frames.preprocess_on_device`), outside the graph, into the same pixel input.
Or step 1 and 2 are done already, frame by frame as the frames arrived (:meth:`PerceptionEncoder.perceive_frames`;
``Clip.features``): a CLIP frame sees no other frame, so its tokens are the same whenever it runs, and a clip that
closes is left with steps 3 and 4 only, about half its perception.
A pass of at most ``max_graph_frames`` arrived frames (a closing clip's last frame, a few streams' new ones) is
replayed from a graph too, padded to 1, 2, 4, ... frames: eagerly, its hundreds of small kernels cost more than
their work (on an H200 one frame took 4.9 ms eagerly and 1.8 ms from the graph; 32 frames 13.0 and 12.8 ms).
Or part of step 4 too (:meth:`PerceptionEncoder.prefill_frames`; ``Clip.prefix``): the first pass is plain causal
and the raw tokens come before the pooled ones, so the time prompt and each frame's 64 projected raw tokens go
through the compact model as the frame arrives, into a K/V cache per clip in progress (the prefix pool, one slot a
stream); a clip that closes is left with its 65 pooled and global positions, attending to that cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

from .. import kernels
from ..cuda_graphs import GraphCache, StaticShapes, copy_from_host, cuda_graphs_enabled
from ..decision.compact_lm import PAGE_MULTIPLE, CompactLM, KVPool
from ..fp8 import fp8_linear, fp8_sequential
from ..types import FRAMES_PER_CLIP, Clip, ClipFeatures, ClipPrefix
from .clips import DEVICE_PREPROCESS_MAX_PIXELS
from .frames import PreprocessorConfig, normalize_with_config, preprocess_on_device, resize_with_config
from .modules import PerceptionDecisionModules

IMAGE_PLACEHOLDER = "<image>"
# Frames preprocessed on the device per pass, which bounds the float intermediates (64 frames of 1280x720: 700 MB).
PREPROCESS_FRAMES_PER_PASS = 64
TIME_PROMPT = "This contains a clip sampled in {start} to {end} seconds" + IMAGE_PLACEHOLDER
# Padded tokens per compact-model call of a prefill (rows x longest row), which bounds a large pass's activations.
PREFILL_TOKENS_PER_CALL = 8192


def time_prompt(clip: Clip) -> str:
    """The clip's time prompt; start and end are rounded to whole seconds."""
    return time_prompt_for(clip.start, clip.end)


def time_prompt_for(start: float, end: float) -> str:
    return TIME_PROMPT.format(start=int(round(start)), end=int(round(end)))


def merge_neighbours(patches: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """[F, g*g, C] patch tokens -> [F, (g/f)^2, f*f*C], each merged token's channels ordered TL, TR, BL, BR."""
    frames, count, channels = patches.shape
    side = int(round(count**0.5))
    merged_side = side // factor
    # Row = merged_row * factor + sub_row, column likewise; the sub-position becomes the channel block.
    grid = patches.reshape(frames, merged_side, factor, merged_side, factor, channels)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(frames, merged_side * merged_side, factor * factor * channels)


def pool_tokens(merged: torch.Tensor, pool_num: int) -> torch.Tensor:
    """[N, frames, m*m, D] merged tokens -> [N, frames*pool_num + 1, D]: per-frame cell means, then a global mean.

    Cells are a sqrt(pool_num)^2 grid per frame, row-major, frame-major. Means are taken in fp32.
    """
    clips, frames, count, dim = merged.shape
    side, cells = int(round(count**0.5)), int(round(pool_num**0.5))
    block = side // cells
    grid = merged.float().reshape(clips, frames, cells, block, cells, block, dim)
    pooled = grid.mean(dim=(3, 5)).reshape(clips, frames * cells * cells, dim)
    global_mean = merged.float().reshape(clips, frames * count, dim).mean(dim=1, keepdim=True)
    return torch.cat([pooled, global_mean], dim=1).to(merged.dtype)


@dataclass(frozen=True)
class PerceptionBucket:
    """The static shape (and graph key) of a padded perception pass: clips, sequence tokens, one clip's pixels."""

    clips: int
    length: int
    clip_shape: tuple[int, ...]  # [frames, 3, H, W]; of perceived clips [frames, tokens, raw_dim]
    perceived: bool = False  # the clips come as their frames' CLIP tokens (Clip.features), not pixels


class _ClipLinears(NamedTuple):
    """One CLIP layer's matmuls: q/k/v merged into one, the attention's output, the MLP's two."""

    qkv: nn.Module
    out: nn.Module
    fc1: nn.Module
    fc2: nn.Module


@dataclass
class _LaunchedChunk:
    """A chunk of clips whose device work is queued; its raw may still be on its way to host memory."""

    clips: Sequence[Clip]
    raw: torch.Tensor  # on raw_device, or a pinned staging buffer that ``copied`` says is filled
    memory: torch.Tensor
    indicator: torch.Tensor
    copied: torch.cuda.Event | None


class _PinnedPair:
    """Two reusable pinned host buffers taken in turn, so the host fills or reads one while a copy of the other
    runs. A buffer is handed out again only once the copy recorded on it has finished."""

    def __init__(self, min_rows: int):
        self.min_rows = min_rows
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._copies: list[torch.cuda.Event | None] = [None, None]
        self._next = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, int]:
        index, self._next = self._next, 1 - self._next
        if self._copies[index] is not None:
            self._copies[index].synchronize()
        buffer = self._buffers[index]
        if buffer is None or buffer.shape[0] < shape[0] or buffer.shape[1:] != shape[1:] or buffer.dtype != dtype:
            rows = max(shape[0], self.min_rows)
            buffer = self._buffers[index] = torch.empty((rows, *shape[1:]), dtype=dtype, pin_memory=True)
        return buffer[: shape[0]], index

    def copy_recorded(self, index: int) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record()
        self._copies[index] = event
        return event


class PerceptionEncoder:
    """CLIP tower + pool projector + compact-LLM first pass, for many clips (of many streams) at once.

    ``raw`` is returned on ``raw_device`` (host memory by default: 8 MB a clip at real shapes in 16-bit), M and T on
    the model's device. Every returned tensor owns its storage, so keeping one clip keeps no batch alive.

    On a GPU the clips go in chunks of ``max_clips_per_pass``, pipelined: while the GPU runs one chunk, the host
    stages the next chunk's pixels and copies the previous chunk's raw into each clip's own tensor (about 1 GB of
    host memory traffic per 64 clips, which would otherwise leave the GPU idle).

    ``cuda_graphs``: chunks of at most ``max_graph_clips`` clips take the static-shape path (CUDA graphs on a GPU,
    the same padded code eagerly elsewhere), and so do passes of at most ``max_graph_frames`` arrived frames
    (``perceive_frames``); off with False or ``DISPIDER_CUDA_GRAPHS=0``.
    ``preprocessor``: how clips that come as frames are preprocessed on the device (CLIP's defaults when None).
    """

    def __init__(self, modules: PerceptionDecisionModules, *, max_frames_per_batch: int = 256,
                 max_clips_per_pass: int = 16, raw_device: str | torch.device = "cpu", lm: CompactLM | None = None,
                 cuda_graphs: bool = True, max_graph_clips: int = 8, max_graph_frames: int = 32, fp8: bool = False,
                 preprocessor: PreprocessorConfig | None = None, prefix_slots: int = 0):
        self.modules = modules
        self.preprocessor = preprocessor or PreprocessorConfig()
        self.lm = lm or CompactLM(modules.language_model, fp8=fp8)
        self.cuda_graphs = cuda_graphs_enabled(cuda_graphs) and max_graph_clips > 0
        self.graph_shapes = StaticShapes(max_batch=max_graph_clips if self.cuda_graphs else 0, length_multiple=32,
                                         max_length=4096)
        self.graphs = GraphCache(modules.device, enabled=self.cuda_graphs)
        # The arrived frames' tower passes (perceive_frames) have graphs of their own: their pool and buckets.
        self.frame_shapes = StaticShapes(max_batch=max_graph_frames if cuda_graphs_enabled(cuda_graphs) else 0)
        self.frame_graphs = GraphCache(modules.device, enabled=self.frame_shapes.max_batch > 0)
        self.max_frames_per_batch = max_frames_per_batch
        self.max_clips_per_pass = max_clips_per_pass
        self.raw_device = torch.device(raw_device)
        self._pixel_staging = _PinnedPair(max_clips_per_pass)
        self._frame_staging = _PinnedPair(max_clips_per_pass)  # uint8 frames of clips preprocessed on the device
        self._raw_staging = _PinnedPair(max_clips_per_pass)
        self._arrived_staging = _PinnedPair(0)  # uint8 frames of perceive_frames, flat
        tower = modules.vision_tower
        self._tower = getattr(tower, "vision_model", tower)  # transformers 4 wraps the layers one level down
        num_layers = len(self._tower.encoder.layers)
        # hidden_states has num_layers + 1 entries (0 = embeddings): run only the layers the select layer needs.
        self._layers_to_run = modules.select_layer % (num_layers + 1)
        self._quick_gelu = self._tower.config.hidden_act == "quick_gelu"  # else the layers run as transformers'
        self._clip_linears = [self._layer_linears(layer, fp8) for layer in self._tower.encoder.layers]
        # fp8: the CLIP layers' and the projector's matmuls with FP8 weights (dispider_vllm/fp8.py).
        self._projector = fp8_sequential(modules.mm_projector) if fp8 else modules.mm_projector
        # K/V of the clips in progress (prefill_frames); made on first use unless sized here.
        self.prefix_pool: KVPool | None = self._new_prefix_pool(prefix_slots) if prefix_slots else None

    @staticmethod
    def _layer_linears(layer, fp8: bool) -> _ClipLinears:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = kernels.merged_linear(attn, "_dispider_qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
        linears = _ClipLinears(qkv=qkv, out=attn.out_proj, fc1=mlp.fc1, fc2=mlp.fc2)
        if not fp8:
            return linears
        return _ClipLinears(*(fp8_linear(linear) for linear in (linears.qkv, linears.out, linears.fc1, linears.fc2)))

    @torch.inference_mode()
    def encode(self, clips: Sequence[Clip]) -> list[ClipFeatures]:
        """The clips' (raw, M, T), in order. Clips of pixels, clips whose frames were perceived already and clips
        whose prefix is cached go in separate passes (the CLIP tower and the whole first pass; the first pass;
        its last 65 positions)."""
        groups: dict[str, list[int]] = {}
        for index, clip in enumerate(clips):
            groups.setdefault(_work_left(clip), []).append(index)
        if len(groups) == 1:
            return self._encode_alike(clips)
        features: list[ClipFeatures | None] = [None] * len(clips)
        for group in groups.values():
            for index, feature in zip(group, self._encode_alike([clips[i] for i in group])):
                features[index] = feature
        return features

    # ---- the compact model's prefix, cached as the frames arrive ------------------------------------------------
    def open_prefix(self, clip_index: int, start: float, end: float) -> ClipPrefix:
        """A slot of the prefix pool for the clip about to start (its time prompt's seconds as it will close)."""
        if self.prefix_pool is None:
            self.prefix_pool = self._new_prefix_pool(4)
        return ClipPrefix(clip_index, start, end, slot=self.prefix_pool.allocate())

    def release_prefix(self, prefix: ClipPrefix) -> None:
        """Give the prefix's slot back (again: nothing)."""
        if prefix.slot is not None:
            self.prefix_pool.release(prefix.slot)
            prefix.slot = None

    @torch.inference_mode()
    def prefill_frames(self, items: Sequence[tuple[ClipPrefix, Sequence[torch.Tensor]]]) -> None:
        """Each prefix's next frames (their merged CLIP tokens [64, raw_dim], in order) through the compact model
        into the prefix's K/V, after the time prompt when the prefix is empty: one row per prefix, rows of many
        streams in a few calls. If any of it fails, every prefix given is marked broken (their clips then go whole)
        and the error is raised."""
        live = [(prefix, frames) for prefix, frames in items if prefix.slot is not None and not prefix.broken]
        try:
            self._prefill_rows(live)
        except Exception:
            for prefix, _ in live:
                prefix.broken = True
            raise

    def _prefill_rows(self, live: Sequence[tuple[ClipPrefix, Sequence[torch.Tensor]]]) -> None:
        if not live:
            return
        with record_function("perception.prefill_project"):
            projected = self._projector(torch.cat([torch.stack(list(frames)) for _, frames in live]).flatten(0, 1))
            texts = iter(self.lm.embed_many([self._prompt_before(prefix) for prefix, _ in live if not prefix.frames]))
            rows, first = [], 0
            for prefix, frames in live:
                last = first + len(frames) * self.modules.resolution
                tokens = projected[first:last]
                rows.append(tokens if prefix.frames else torch.cat([next(texts), tokens]))
                first = last
        with record_function("perception.prefill"):
            for call in self._prefill_calls([prefix for prefix, _ in live], [len(row) for row in rows]):
                self.lm.forward_cached(self.prefix_pool, [live[i][0].slot for i in call], [rows[i] for i in call],
                                       [len(rows[i]) for i in call])
                for i in call:
                    live[i][0].frames += len(live[i][1])

    def _prefill_calls(self, prefixes: Sequence[ClipPrefix], lengths: Sequence[int]) -> list[list[int]]:
        """Rows (indices) in calls that keep each call's longest prefix plus longest row (rounded as a graph rounds
        it) within the pool's capacity, and its padded tokens within PREFILL_TOKENS_PER_CALL."""
        pool, multiple = self.prefix_pool, self.lm.graph_shapes.length_multiple
        order = sorted(range(len(prefixes)), key=lambda i: pool.length(prefixes[i].slot))
        calls: list[list[int]] = []
        longest_prefix = longest_row = 0
        for i in order:
            prefix, row = pool.length(prefixes[i].slot), -(-lengths[i] // multiple) * multiple
            grown_prefix, grown_row = max(longest_prefix, prefix), max(longest_row, row)
            if not calls or grown_prefix + grown_row > pool.capacity \
                    or (len(calls[-1]) + 1) * grown_row > PREFILL_TOKENS_PER_CALL:
                calls.append([])
                grown_prefix, grown_row = prefix, row
            calls[-1].append(i)
            longest_prefix, longest_row = grown_prefix, grown_row
        return calls

    def _prompt_before(self, prefix: ClipPrefix) -> list[int]:
        return self._split_prompt(time_prompt_for(prefix.start, prefix.end))[0]

    def _new_prefix_pool(self, slots: int) -> KVPool:
        """Slots long enough for the longest time prompt, a clip's raw tokens and its padded last positions."""
        frames, multiple = FRAMES_PER_CLIP, self.lm.graph_shapes.length_multiple
        longest_prompt = len(self._prompt_before(ClipPrefix(0, 999_984.0, 1_000_000.0, None)))
        last = -(-(self._image_tokens(frames) - frames * self.modules.resolution) // multiple) * multiple
        capacity = -(-(longest_prompt + frames * self.modules.resolution + last + multiple) // multiple) * multiple
        # Whole pages: on a GPU with vLLM's FlashAttention the prefill then reads each slot in place, as the
        # decision does (compact_lm's paged path), instead of gathering K/V under a mask.
        return self.lm.new_pool(slots=slots, capacity=capacity, growth_multiple=PAGE_MULTIPLE)

    def capture_prefill_graphs(self) -> int:
        """Capture the prefix pool's graphs (rows x row length) now (CompactLM.capture_cached_graphs); returns the
        graphs alive."""
        if not self.lm.graphs.graphed:
            return 0
        if self.prefix_pool is None:
            self.prefix_pool = self._new_prefix_pool(4)
        return self.lm.capture_cached_graphs(self.prefix_pool)

    @torch.inference_mode()
    def perceive_frames(self, frames: Sequence[np.ndarray], *, graphed: bool = True) -> list[torch.Tensor]:
        """Sampled frames (RGB uint8 [H, W, 3], of any sizes) -> each frame's merged CLIP tokens [64, raw_dim] on
        the model's device, each owning its storage: steps 1 and 2 of a clip's perception, run as its frames arrive
        (batched over every stream's new frames) so that a closing clip only has its pass left (Clip.features).
        Frames of one size are preprocessed on the device together; frames above 1280x720 on the host.
        Up to ``max_graph_frames`` frames go through the tower padded to a graph's bucket (replayed on a GPU);
        ``graphed=False``: eagerly (a pass on another CUDA stream, which must not share the graphs' buffers)."""
        rows = self.frame_shapes.batch(len(frames)) if graphed else None
        if rows is None:
            pixels = torch.empty((len(frames), 3, self.preprocessor.crop_height, self.preprocessor.crop_width),
                                 dtype=torch.float32, device=self.modules.device)
        else:
            pixels = self.frame_graphs.inputs(rows, lambda: self._frame_inputs(rows))["pixels"]
        # Streams of other frame sizes interleave: one copy and one preprocessing pass per size, not per neighbour.
        order = sorted(range(len(frames)), key=lambda i: frames[i].shape)
        ordered = [frames[i] for i in order]
        for start, end in _same_shape_runs(ordered):
            self._write_frame_pixels(ordered[start:end], pixels[start:end])
        with record_function("perception.frames_tower"):
            if rows is None:
                merged = self._frames_tower({"pixels": pixels})
            else:  # the rows past the frames hold an earlier pass's pixels: a CLIP frame sees no other frame
                merged = self.frame_graphs.run(rows, self._frames_tower)
        tokens: list[torch.Tensor | None] = [None] * len(frames)
        for position, index in enumerate(order):
            # A view would keep the whole batch alive until its last clip (and a graph's output is overwritten by
            # its next replay).
            tokens[index] = merged[position].clone()
        return tokens

    def capture_frame_graphs(self) -> int:
        """Capture the frames' tower graph of every bucket now (as ``capture_graphs``); returns the graphs alive."""
        if not self.frame_graphs.graphed:
            return 0
        with torch.inference_mode():
            for rows in self.frame_shapes.batch_buckets():
                self.frame_graphs.inputs(rows, lambda rows=rows: self._frame_inputs(rows))
                self.frame_graphs.run(rows, self._frames_tower)
        return len(self.frame_graphs)

    def _frame_inputs(self, rows: int) -> dict[str, torch.Tensor]:
        shape = (rows, 3, self.preprocessor.crop_height, self.preprocessor.crop_width)
        return {"pixels": torch.zeros(shape, dtype=torch.float32, device=self.modules.device)}

    def _frames_tower(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The graph body of perceive_frames: preprocessed pixels [F, 3, h, w] -> merged CLIP tokens [F, 64, 4C]."""
        pixels = inputs["pixels"]
        patches = torch.cat([self.patch_features(pixels[i : i + self.max_frames_per_batch])
                             for i in range(0, pixels.shape[0], self.max_frames_per_batch)])
        return merge_neighbours(patches, self.modules.merge_factor)

    def _write_frame_pixels(self, frames: Sequence[np.ndarray], target: torch.Tensor) -> None:
        """Frames of one size -> preprocessed pixels in ``target`` [n, 3, h, w] on the model's device."""
        height, width = frames[0].shape[:2]
        if height * width > DEVICE_PREPROCESS_MAX_PIXELS:  # a batch of large frames would cost GPU memory by the GB
            host = normalize_with_config(resize_with_config(list(frames), self.preprocessor), self.preprocessor)
            target.copy_(host)
            return
        uint8 = torch.empty((len(frames), height, width, 3), dtype=torch.uint8, device=target.device)
        self._copy_frames(frames, uint8)
        with record_function("perception.preprocess_frames"):
            for first in range(0, len(frames), PREPROCESS_FRAMES_PER_PASS):
                last = first + PREPROCESS_FRAMES_PER_PASS
                target[first:last] = preprocess_on_device(uint8[first:last], self.preprocessor)

    def _copy_frames(self, frames: Sequence[np.ndarray], target: torch.Tensor) -> None:
        """np.stack(frames) into ``target``; to a GPU through a reused pinned buffer, as _copy_stacked."""
        if target.device.type != "cuda":
            target.copy_(torch.from_numpy(np.stack(frames)))
            return
        # One flat buffer whatever the frames' size (a pinned allocation per new shape would be slow), grown as needed.
        staging, index = self._arrived_staging.take((target.numel(),), torch.uint8)
        staging = staging.view(target.shape)
        np.stack(frames, out=staging.numpy())
        target.copy_(staging, non_blocking=True)
        self._arrived_staging.copy_recorded(index)

    def _encode_alike(self, clips: Sequence[Clip]) -> list[ClipFeatures]:
        features: list[ClipFeatures] = []
        previous: _LaunchedChunk | None = None
        for first in range(0, len(clips), self.max_clips_per_pass):
            launched = self._launch_chunk(clips[first : first + self.max_clips_per_pass])
            if previous is not None:  # host work of the previous chunk, while the device runs this one
                features += self._finish_chunk(previous)
            previous = launched
        if previous is not None:
            features += self._finish_chunk(previous)
        return features

    def _launch_chunk(self, clips: Sequence[Clip]) -> _LaunchedChunk:
        if clips[0].prefilled:
            return self._launch_prefilled(clips)
        pieces = [self._split_prompt(time_prompt(clip)) for clip in clips]
        bucket = self.perception_bucket(clips, pieces)
        if bucket is not None:
            return self._launch_static(clips, pieces, bucket)
        # Named ranges show up in torch.profiler traces (benchmarks/sidecar_bench.py --profile); free otherwise.
        with record_function("perception.clip_tower"):
            raw = _perceived_raw(clips) if clips[0].perceived else self.raw_tokens(self._pixels_on_device(clips))
        with record_function("perception.project"):
            projected = self.project(raw)
        with record_function("perception.first_pass"):
            memory, indicator = self._first_pass(pieces, projected)
        with record_function("perception.raw_to_host"):
            raw, copied = self._start_raw_copy(raw)
        return _LaunchedChunk(clips, raw, memory, indicator, copied)

    def _launch_prefilled(self, clips: Sequence[Clip]) -> _LaunchedChunk:
        """Clips whose time prompt and raw tokens are in their prefix's K/V: the pooled and global tokens (and any
        prompt text after the image) after it, committing nothing; M and T are read off those positions."""
        with record_function("perception.project"):
            features = torch.stack([clip.features for clip in clips])  # [N, 16, 64, raw_dim]
            last = self._projector(pool_tokens(features, self.modules.pool_num))  # [N, 16 * pool_num + 1, H]
            after = [self._split_prompt(time_prompt(clip))[1] for clip in clips]
            rows = [torch.cat([tokens, self.lm.embed(ids)]) if ids else tokens for tokens, ids in zip(last, after)]
        with record_function("perception.first_pass"):
            hidden = self.lm.forward_cached(self.prefix_pool, [clip.prefix.slot for clip in clips], rows,
                                            [0] * len(clips))
        pooled = last.shape[1] - 1
        with record_function("perception.raw_to_host"):
            raw, copied = self._start_raw_copy(features.flatten(1, 2))
        return _LaunchedChunk(clips, raw, hidden[:, :pooled], hidden[:, pooled], copied)

    # ---- the static-shape (graph) path ----------------------------------------------------------------------
    def capture_graphs(self, clip_shape: tuple[int, ...], clip_starts: Sequence[float] = (0.0, 99_984.0), *,
                       perceived: bool = False) -> int:
        """Capture the graph of every clip-count bucket now, for the time prompts of clips starting at
        ``clip_starts`` seconds (their digits set the prompt's length bucket); returns the graphs alive.
        ``perceived``: also those of clips whose frames went through the CLIP tower already (Clip.features).

        Otherwise each bucket is captured by the first step that needs it, which stalls the sidecar's loop for a
        few tenths of a second while live streams wait (the tail of the decision latency under load)."""
        if not self.graphs.graphed:
            return 0
        seconds = clip_shape[0]
        kinds = [dict(pixels=torch.zeros(clip_shape, dtype=torch.float32))]
        if perceived:
            features = torch.zeros((seconds, self.modules.resolution, self.modules.raw_dim), dtype=self.modules.dtype,
                                   device=self.modules.device)
            kinds.append(dict(pixels=torch.empty(0), features=features))
        for kind in kinds:
            for start in clip_starts:
                for count in self.graph_shapes.batch_buckets():
                    self.encode([Clip(i, start, start + seconds, **kind) for i in range(count)])
        return len(self.graphs)

    def perception_bucket(self, clips: Sequence[Clip],
                          pieces: Sequence[tuple[list[int], list[int]]]) -> PerceptionBucket | None:
        """The static shape these clips (with their split time prompts) run in, or None when they run eagerly."""
        clip_shape = self.input_shape(clips[0])
        image_tokens = self._image_tokens(clip_shape[0])
        rows = self.graph_shapes.batch(len(clips))
        length = self.graph_shapes.length(max(len(before) + len(after) for before, after in pieces) + image_tokens)
        if rows is None or length is None or any(self.input_shape(c) != clip_shape for c in clips):
            return None
        return PerceptionBucket(rows, length, clip_shape, perceived=clips[0].perceived)

    def input_shape(self, clip: Clip) -> tuple[int, ...]:
        """The clip's pixels as the CLIP tower takes them: [16, 3, h, w] (frames still to preprocess included); or
        its frames' CLIP tokens [16, 64, raw_dim] when it has them already."""
        if clip.perceived:
            return tuple(clip.features.shape)
        if clip.preprocessed:
            return tuple(clip.pixels.shape)
        return (clip.pixels.shape[0], 3, self.preprocessor.crop_height, self.preprocessor.crop_width)

    def _launch_static(self, clips: Sequence[Clip], pieces: Sequence[tuple[list[int], list[int]]],
                       bucket: PerceptionBucket) -> _LaunchedChunk:
        self.graphs.bind(self.lm.rope_table())
        static = self.graphs.inputs(bucket, lambda: self._perception_inputs(bucket))
        with record_function("perception.stage_inputs"):
            if bucket.perceived:
                torch.stack([clip.features for clip in clips], out=static["features"][: len(clips)])
            else:
                self._stage_pixels(clips, static["pixels"])
            copy_from_host(static["text"], self._text_rows(pieces, bucket))
        with record_function("perception.graph"):
            raw, memory, indicator = self.graphs.run(bucket, self._perception_pass)
        count = len(clips)
        # The graph's outputs are overwritten by its next replay (the next chunk's, maybe before this one is
        # finished): take copies now; a copy to the host queued now is safe as it is.
        memory, indicator = memory[:count].clone(), indicator[:count].clone()
        with record_function("perception.raw_to_host"):
            raw, copied = self._start_raw_copy(raw[:count])
        if copied is None and self.graphs.graphed:
            raw = raw.clone()
        return _LaunchedChunk(clips, raw, memory, indicator, copied)

    def _perception_inputs(self, bucket: PerceptionBucket) -> dict[str, torch.Tensor]:
        """Static inputs: the clips' pixels (or their frames' CLIP tokens), and per clip its image's start then its
        token ids (see _text_rows)."""
        device = self.modules.device
        text = torch.zeros(bucket.clips, 1 + bucket.length, dtype=torch.long, device=device)
        if bucket.perceived:
            return {"features": torch.zeros(bucket.clips, *bucket.clip_shape, dtype=self.modules.dtype, device=device),
                    "text": text}
        return {"pixels": torch.zeros(bucket.clips, *bucket.clip_shape, dtype=torch.float32, device=device),
                "text": text}

    def _text_rows(self, pieces: Sequence[tuple[list[int], list[int]]], bucket: PerceptionBucket) -> torch.Tensor:
        """[clips, 1 + length] on the host: the image's start, then the prompt's ids with placeholder ids (0) where
        the image and the padding go. Padded clips are all zeros: start 0, a valid id everywhere."""
        rows = torch.zeros(bucket.clips, 1 + bucket.length, dtype=torch.long)
        image_tokens = self._image_tokens(bucket.clip_shape[0])
        for row, (before, after) in enumerate(pieces):
            rows[row, 0] = len(before)
            rows[row, 1 : 1 + len(before)] = torch.tensor(before, dtype=torch.long)
            tail = 1 + len(before) + image_tokens
            rows[row, tail : tail + len(after)] = torch.tensor(after, dtype=torch.long)
        return rows

    def _stage_pixels(self, clips: Sequence[Clip], static: torch.Tensor) -> None:
        """The clips' pixels into the first rows of the static pixel buffer."""
        self._write_pixels(clips, static[: len(clips)])

    def _write_pixels(self, clips: Sequence[Clip], target: torch.Tensor) -> None:
        """The clips' pixels into ``target`` [N, 16, 3, h, w] on the model's device: preprocessed pixels copied,
        frames copied as uint8 and preprocessed there. Each run of alike neighbours goes at once, into a slice of
        ``target`` (an index list would be a blocking host-to-device copy)."""
        for start, end in _alike_runs(clips):
            run = clips[start:end]
            pixels = [clip.pixels for clip in run]
            if run[0].preprocessed:
                self._copy_stacked(pixels, target[start:end], self._pixel_staging)
                continue
            frames = torch.empty((len(run), *pixels[0].shape), dtype=torch.uint8, device=target.device)
            self._copy_stacked(pixels, frames, self._frame_staging)
            flat_frames = frames.flatten(0, 1)
            flat_target = target[start:end].view(-1, *target.shape[2:])  # a view: written in place
            with record_function("perception.preprocess_frames"):
                for first in range(0, flat_frames.shape[0], PREPROCESS_FRAMES_PER_PASS):
                    last = first + PREPROCESS_FRAMES_PER_PASS
                    flat_target[first:last] = preprocess_on_device(flat_frames[first:last], self.preprocessor)

    @staticmethod
    def _copy_stacked(pieces: Sequence[torch.Tensor], target: torch.Tensor, staging_pair: _PinnedPair) -> None:
        """torch.stack(pieces) into ``target``; to a GPU through a reused pinned buffer of the pair (an asynchronous
        copy at full bus speed instead of a pageable one)."""
        if target.device.type != "cuda":
            torch.stack(pieces, out=target)
            return
        staging, index = staging_pair.take(tuple(target.shape), target.dtype)
        torch.stack(pieces, out=staging)
        target.copy_(staging, non_blocking=True)
        staging_pair.copy_recorded(index)

    def _perception_pass(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The graph body: pixels (or CLIP tokens) and text rows -> raw [N, 1024, 4C], M [N, 64, H], T [N, H] of
        every padded clip."""
        raw = inputs["features"].flatten(1, 2) if "features" in inputs else self.raw_tokens(inputs["pixels"])
        projected = self.project(raw)
        starts, ids = inputs["text"][:, 0], inputs["text"][:, 1:]
        embeds = self.lm.model.embed_tokens(ids)
        hidden_size = embeds.shape[-1]
        image = starts[:, None] + torch.arange(projected.shape[1], device=starts.device)[None, :]
        embeds.scatter_(1, image[..., None].expand(-1, -1, hidden_size), projected.to(embeds.dtype))
        hidden = self.lm.forward_padded(embeds)
        raw_count, pooled = self._raw_and_pooled_counts(projected.shape[1])
        memory_at = starts[:, None] + raw_count + torch.arange(pooled + 1, device=starts.device)[None, :]
        states = hidden.gather(1, memory_at[..., None].expand(-1, -1, hidden_size))
        return raw, states[:, :pooled], states[:, pooled]

    def _image_tokens(self, frames: int) -> int:
        """Projected tokens a clip of ``frames`` frames puts at ``<image>``: raw, pooled, one global."""
        return frames * (self.modules.resolution + self.modules.pool_num) + 1

    def _raw_and_pooled_counts(self, image_tokens: int) -> tuple[int, int]:
        frames = (image_tokens - 1) // (self.modules.resolution + self.modules.pool_num)
        return frames * self.modules.resolution, frames * self.modules.pool_num

    def _finish_chunk(self, chunk: _LaunchedChunk) -> list[ClipFeatures]:
        with record_function("perception.keep_clips"):
            if chunk.copied is not None:
                chunk.copied.synchronize()
            return [
                ClipFeatures(index=clip.index, start=clip.start, end=clip.end, raw=chunk.raw[i].clone(),
                             memory=chunk.memory[i].clone(), indicator=chunk.indicator[i].clone())
                for i, clip in enumerate(chunk.clips)
            ]

    def _pixels_on_device(self, clips: Sequence[Clip]) -> torch.Tensor:
        """The clips' pixels [N, 16, 3, H, W] on the model's device, as the CLIP tower takes them."""
        pixels = torch.empty((len(clips), *self.input_shape(clips[0])), dtype=torch.float32, device=self.modules.device)
        self._write_pixels(clips, pixels)
        return pixels

    def _start_raw_copy(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start moving the chunk's raw to ``raw_device``. GPU -> host goes asynchronously into a reused pinned
        buffer (much faster than a pageable copy per clip); the returned event says when it has landed."""
        if not (raw.device.type == "cuda" and self.raw_device.type == "cpu"):
            return raw.to(self.raw_device), None
        staging, index = self._raw_staging.take(tuple(raw.shape), raw.dtype)
        staging.copy_(raw, non_blocking=True)
        return staging, self._raw_staging.copy_recorded(index)

    def raw_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 16, 3, H, W] -> raw [N, 16*64, 4C]: merged CLIP patches, frame-major."""
        clips, frames = pixels.shape[:2]
        flat = pixels.reshape(clips * frames, *pixels.shape[2:])
        patches = torch.cat([self.patch_features(flat[i : i + self.max_frames_per_batch])
                             for i in range(0, flat.shape[0], self.max_frames_per_batch)])
        merged = merge_neighbours(patches, self.modules.merge_factor)
        return merged.reshape(clips, frames * merged.shape[1], merged.shape[2])

    def patch_features(self, frames: torch.Tensor) -> torch.Tensor:
        """[F, 3, H, W] -> [F, patches, C]: CLIP hidden state at the select layer, CLS dropped."""
        tower = self._tower
        hidden = tower.pre_layrnorm(tower.embeddings(frames.to(self.modules.device, self.modules.dtype)))
        for index, layer in enumerate(tower.encoder.layers[: self._layers_to_run]):
            hidden = self._clip_layer(index, layer, hidden)
        return hidden[:, 1:]

    def _clip_layer(self, index: int, layer, hidden: torch.Tensor) -> torch.Tensor:
        """One CLIP encoder layer (pre-norm attention, then the MLP), on merged q/k/v weights and, where vLLM's
        ops load, its one-kernel quick-GELU (the plain one is three kernels over the 4x-wide activation)."""
        if not self._quick_gelu:
            return layer(hidden, None)
        frames, tokens, width = hidden.shape
        attn, linears = layer.self_attn, self._clip_linears[index]
        heads = attn.num_heads
        qkv = linears.qkv(layer.layer_norm1(hidden))
        q, k, v = (x.view(frames, tokens, heads, width // heads).transpose(1, 2) for x in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        hidden = hidden + linears.out(out.transpose(1, 2).reshape(frames, tokens, width))
        activated = kernels.quick_gelu(linears.fc1(layer.layer_norm2(hidden)), fused=self.lm.fused)
        return hidden + linears.fc2(activated)

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """raw [N, 1024, 4C] -> the 1089 projected tokens [N, 1089, H]: raw, 64 pooled, 1 global."""
        frames = raw.shape[1] // self.modules.resolution
        merged = raw.reshape(raw.shape[0], frames, self.modules.resolution, raw.shape[2])
        tokens = torch.cat([raw, pool_tokens(merged, self.modules.pool_num)], dim=1)
        return self._projector(tokens)

    def first_pass(self, prompts: Sequence[str], projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded batch of time-prompt sequences -> M [N, 64, H] and T [N, H]."""
        return self._first_pass([self._split_prompt(prompt) for prompt in prompts], projected)

    def _first_pass(self, pieces: Sequence[tuple[list[int], list[int]]],
                    projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_count, pooled = self._raw_and_pooled_counts(projected.shape[1])
        texts = iter(self.lm.embed_many([ids for piece in pieces for ids in piece]))  # one lookup for the chunk
        sequences, image_starts = [], []
        for (before, _), tokens in zip(pieces, projected):
            sequences.append(torch.cat([next(texts), tokens, next(texts)]))
            image_starts.append(len(before))
        hidden = self.lm.forward(sequences)
        memory = torch.stack([hidden[i, s + raw_count : s + raw_count + pooled] for i, s in enumerate(image_starts)])
        indicator = torch.stack([hidden[i, s + raw_count + pooled] for i, s in enumerate(image_starts)])
        return memory, indicator

    def _split_prompt(self, prompt: str) -> tuple[list[int], list[int]]:
        parts = prompt.split(IMAGE_PLACEHOLDER)
        if len(parts) != 2:
            raise ValueError(f"a time prompt needs exactly one {IMAGE_PLACEHOLDER}: {prompt!r}")
        return self.modules.token_ids(parts[0]), self.modules.token_ids(parts[1]) if parts[1] else []


def _work_left(clip: Clip) -> str:
    """What a clip still needs: its prefix's last positions, the first pass, or the CLIP tower and the pass."""
    return "prefix" if clip.prefilled else "pass" if clip.perceived else "tower"


def _perceived_raw(clips: Sequence[Clip]) -> torch.Tensor:
    """raw [N, 16*64, raw_dim] of clips whose frames were perceived as they arrived."""
    return torch.stack([clip.features for clip in clips]).flatten(1, 2)


def _same_shape_runs(frames: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """[start, end) of each run of neighbouring frames of one shape."""
    runs: list[tuple[int, int]] = []
    for index, frame in enumerate(frames):
        if runs and frames[runs[-1][0]].shape == frame.shape:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def _alike_runs(clips: Sequence[Clip]) -> list[tuple[int, int]]:
    """[start, end) of each run of neighbouring clips alike in kind (preprocessed or frames) and pixel shape."""
    runs: list[tuple[int, int]] = []
    for index, clip in enumerate(clips):
        if runs and _kind(clips[runs[-1][0]]) == _kind(clip):
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def _kind(clip: Clip) -> tuple:
    return clip.preprocessed, tuple(clip.pixels.shape)
