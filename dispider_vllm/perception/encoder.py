"""Perception: clips -> (raw, M, T), batched over the clips of many streams (DISPIDER.md section 2).

Per clip:
  1. CLIP tower on its 16 frames; hidden state at ``select_layer`` (LLaVA's ``hidden_states`` index, 0 being the
     embeddings), CLS dropped -> [16, 256, C].
  2. 2x2 neighbour merge per frame -> 8x8 tokens of 4C channels (TL, TR, BL, BR), frame-major -> raw [1024, 4C].
  3. Pool projector: per frame a 2x2 grid of means over 4x4 merged tokens (64 tokens), one global mean over all
     1024 (1 token); the MLP over all 1089 tokens.
  4. First pass of the compact LLM over ``This contains a clip sampled in {s} to {e} seconds<image>`` with the 1089
     projected tokens at ``<image>``: plain causal, positions from 0. M = the 64 pooled positions, T = the global one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from .. import kernels
from ..decision.compact_lm import CompactLM
from ..types import Clip, ClipFeatures
from .modules import PerceptionDecisionModules

IMAGE_PLACEHOLDER = "<image>"
TIME_PROMPT = "This contains a clip sampled in {start} to {end} seconds" + IMAGE_PLACEHOLDER


def time_prompt(clip: Clip) -> str:
    """The clip's time prompt; start and end are rounded to whole seconds."""
    return TIME_PROMPT.format(start=int(round(clip.start)), end=int(round(clip.end)))


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
    """

    def __init__(self, modules: PerceptionDecisionModules, *, max_frames_per_batch: int = 256,
                 max_clips_per_pass: int = 16, raw_device: str | torch.device = "cpu", lm: CompactLM | None = None):
        self.modules = modules
        self.lm = lm or CompactLM(modules.language_model)
        self.max_frames_per_batch = max_frames_per_batch
        self.max_clips_per_pass = max_clips_per_pass
        self.raw_device = torch.device(raw_device)
        self._pixel_staging = _PinnedPair(max_clips_per_pass)
        self._raw_staging = _PinnedPair(max_clips_per_pass)
        tower = modules.vision_tower
        self._tower = getattr(tower, "vision_model", tower)  # transformers 4 wraps the layers one level down
        num_layers = len(self._tower.encoder.layers)
        # hidden_states has num_layers + 1 entries (0 = embeddings): run only the layers the select layer needs.
        self._layers_to_run = modules.select_layer % (num_layers + 1)
        self._quick_gelu = self._tower.config.hidden_act == "quick_gelu"  # else the layers run as transformers'
        self._clip_qkv = [kernels.merged_linear(layer.self_attn, "_dispider_qkv", [layer.self_attn.q_proj,
                          layer.self_attn.k_proj, layer.self_attn.v_proj]) for layer in self._tower.encoder.layers]

    @torch.inference_mode()
    def encode(self, clips: Sequence[Clip]) -> list[ClipFeatures]:
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
        # Named ranges show up in torch.profiler traces (benchmarks/sidecar_bench.py --profile); free otherwise.
        with record_function("perception.clip_tower"):
            raw = self.raw_tokens(self._pixels_on_device(clips))
        with record_function("perception.project"):
            projected = self.project(raw)
        with record_function("perception.first_pass"):
            memory, indicator = self.first_pass([time_prompt(clip) for clip in clips], projected)
        with record_function("perception.raw_to_host"):
            raw, copied = self._start_raw_copy(raw)
        return _LaunchedChunk(clips, raw, memory, indicator, copied)

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
        """The clips' pixels [N, 16, 3, H, W] on the model's device. To a GPU they go through a reused pinned
        buffer: an asynchronous copy at full bus speed instead of a pageable one of a fresh batch."""
        if self.modules.device.type != "cuda":
            return torch.stack([clip.pixels for clip in clips])
        shape = (len(clips), *clips[0].pixels.shape)
        staging, index = self._pixel_staging.take(shape, torch.float32)
        torch.stack([clip.pixels for clip in clips], out=staging)
        on_device = staging.to(self.modules.device, non_blocking=True)
        self._pixel_staging.copy_recorded(index)
        return on_device

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
        attn = layer.self_attn
        heads = attn.num_heads
        qkv = F.linear(layer.layer_norm1(hidden), *self._clip_qkv[index])
        q, k, v = (x.view(frames, tokens, heads, width // heads).transpose(1, 2) for x in qkv.chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(frames, tokens, width))
        activated = kernels.quick_gelu(layer.mlp.fc1(layer.layer_norm2(hidden)), fused=self.lm.fused)
        return hidden + layer.mlp.fc2(activated)

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """raw [N, 1024, 4C] -> the 1089 projected tokens [N, 1089, H]: raw, 64 pooled, 1 global."""
        frames = raw.shape[1] // self.modules.resolution
        merged = raw.reshape(raw.shape[0], frames, self.modules.resolution, raw.shape[2])
        tokens = torch.cat([raw, pool_tokens(merged, self.modules.pool_num)], dim=1)
        return self.modules.mm_projector(tokens)

    def first_pass(self, prompts: Sequence[str], projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One padded batch of time-prompt sequences -> M [N, 64, H] and T [N, H]."""
        frames = (projected.shape[1] - 1) // (self.modules.resolution + self.modules.pool_num)
        raw_count, pooled = frames * self.modules.resolution, frames * self.modules.pool_num
        pieces = [self._split_prompt(prompt) for prompt in prompts]
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
