"""The compact Qwen2 run on input embeddings, with a KV cache shared by many streams.

Dispider feeds the compact LLM's own post-norm hidden states back in as input embeddings (DISPIDER.md section 8.2),
so every pass here takes embeddings and returns post-final-norm hidden states. The weights are those of a
transformers ``Qwen2Model``; the attention math (RoPE, GQA, masking) is done here so that the cache layout and the
batching across streams are ours.

KV cache design (:class:`KVPool`): one pool tensor per K and V, ``[layers, slots, capacity, kv_heads, head_dim]``
(position before head, as a paged cache of one page a slot, so that FlashAttention can read it in place).
Each stream owns one slot; positions ``[0, length)`` of a slot hold the stream's committed prefix, positions after
it are scratch. A batched cached forward writes every row's suffix K/V into the scratch right after that row's
prefix, attends over ``[0, max_length + suffix)`` of the selected slots with a causal mask offset by each row's own
prefix length, and then commits only the first ``keep`` suffix tokens of each row (the length moves; nothing is
copied). So: append = commit everything, evaluate-without-keeping = commit nothing, truncate = lower the length.
When the batch is a run of consecutive slots the K/V are read as a view, without a copy.

Small batches (up to ``max_graph_batch`` rows, suffixes up to ``max_graph_length`` tokens) take a static-shape path
instead, replayed from a CUDA graph on a GPU (:mod:`dispider_vllm.cuda_graphs`): the batch is padded to a bucket
(1, 2, 4, ... rows; suffix lengths rounded up to a multiple of 32); on the masked path every row attends over the
pool's whole capacity (the mask, built inside the graph from the rows' prefix lengths, hides what a row must not
see) and K/V are always gathered by slot index, since a view's address would be baked into the graph; the paged
path reads each row's slot up to its own length, given as a device tensor. Padded rows have prefix
length 0 and write into the pool's scratch slot (:meth:`KVPool.scratch_slot`, never given to a stream); the real
rows write their padded suffix past their prefix, as the eager path does, and commit only ``keep`` tokens. When the
pool grows (new tensors), the graphs are dropped and captured again. On a CPU the same padded path runs eagerly.

On a GPU with vLLM's FlashAttention the cached path reads each row's K/V in place (the slot as the row's one
page, ``kernels.paged_attention``), over its own prefix and suffix only, however large the pool's capacity. Without
it (the CPU, or ``DISPIDER_PAGED_ATTENTION=0``) the K/V are read or gathered and attended with an additive mask:
GQA folds the query heads of a KV head into the query length, so K/V are never repeated, and on a GPU the masked
path runs the memory-efficient SDPA kernel (cuDNN's re-planning per shape cost more host time than the step's GPU
time); the causal path without a cache runs flash attention.

The layers run on merged weights (q/k/v as one matmul, gate/up as one) and, where vLLM's compiled ops load, on its
fused RMSNorm (with the residual add), RoPE and SiLU-gate kernels (:mod:`dispider_vllm.kernels`). Small host
tensors (token ids, slot numbers, lengths) go to the device through pinned memory without a stream sync, so the
host can queue the next pass while the device still runs this one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import Qwen2Model

from .. import kernels
from ..fp8 import fp8_linear
from ..cuda_graphs import GraphCache, StaticShapes, copy_from_host, cuda_graphs_enabled

AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


SCRATCH_SLOT = 0  # see KVPool.scratch_slot
# A slot is read as one page: FlashAttention's paged K/V wants pages of a multiple of 256 positions (FA2). Both
# pools (the decision's, and the prefix pool of --frame-perception prefill) are sized in such steps.
PAGE_MULTIPLE = 256


class KVPool:
    """Per-stream KV caches of the compact LLM, stored as slots of one pool (see the module docstring).

    ``slots`` slots for streams, numbered from 1, plus the scratch slot 0 that no stream is given (where the padded
    rows of a static-shape batch write), so that a pool sized for N streams holds N streams without growing.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, slots: int = 4, capacity: int = 1024, growth_multiple: int = 256):
        self.growth_multiple = growth_multiple
        shape = self.shape(num_layers, num_kv_heads, head_dim, slots=slots, capacity=capacity,
                           growth_multiple=growth_multiple)
        # Zeros, not empty: masked-out scratch is still multiplied by a zero weight, and 0 * NaN would leak.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * (1 + slots)
        self.free = list(range(slots, SCRATCH_SLOT, -1))

    @staticmethod
    def shape(num_layers: int, num_kv_heads: int, head_dim: int, *, slots: int, capacity: int,
              growth_multiple: int = 256) -> tuple[int, ...]:
        """The shape of ``k`` (and ``v``) of a pool of ``slots`` streams, before it is allocated."""
        capacity = -(-capacity // growth_multiple) * growth_multiple  # whole multiples, as every growth after
        return (num_layers, 1 + slots, capacity, num_kv_heads, head_dim)

    @property
    def capacity(self) -> int:
        return int(self.k.shape[2])

    @property
    def num_slots(self) -> int:
        """Slots for streams (the scratch slot aside)."""
        return int(self.k.shape[1]) - 1

    @property
    def bytes_per_token(self) -> int:
        layers, _, _, heads, dim = self.k.shape
        return 2 * layers * heads * dim * self.k.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes reserved by the pool (all slots, full capacity)."""
        return self.k.nbytes + self.v.nbytes

    def allocate(self) -> int:
        if not self.free:
            self._grow(slots=2 * self.num_slots)
        slot = self.free.pop()
        self.lengths[slot] = 0
        return slot

    def scratch_slot(self) -> int:
        """The slot no stream is ever given: the padded rows of a static-shape batch write their K/V there, so they
        touch no stream's cache. Its content is whatever they wrote; nothing real reads it."""
        return SCRATCH_SLOT

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.free.append(slot)

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def truncate(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"cannot truncate slot {slot} of length {self.lengths[slot]} to {length}")
        self.lengths[slot] = length

    def reserve(self, tokens: int) -> None:
        """Make every slot hold at least ``tokens`` positions (prefix + scratch)."""
        if tokens > self.capacity:
            grown = max(tokens, self.capacity * 3 // 2)
            self._grow(capacity=-(-grown // self.growth_multiple) * self.growth_multiple)

    def _grow(self, *, slots: int | None = None, capacity: int | None = None) -> None:
        """To ``slots`` stream slots and/or ``capacity`` positions; new tensors, so anything that kept the old
        ones' addresses (a CUDA graph) must drop them."""
        layers, old_rows, old_capacity, heads, dim = self.k.shape
        rows, capacity = (1 + slots if slots else old_rows), capacity or old_capacity
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((layers, rows, capacity, heads, dim))
            new[:, :old_rows, :old_capacity] = old
            setattr(self, name, new)
        self.free = list(range(rows - 1, old_rows - 1, -1)) + self.free
        self.lengths += [0] * (rows - old_rows)

    def write(self, layer: int, slot_index: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k, v [B, kv_heads, L, head_dim] of row b at ``positions[b]`` of slot ``slot_index[b]``."""
        rows = slot_index[:, None]
        self.k[layer][rows, positions] = k.transpose(1, 2)
        self.v[layer][rows, positions] = v.transpose(1, 2)

    def read(self, layer: int, slots: Sequence[int], slot_index: torch.Tensor,
             tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, kv_heads, tokens, head_dim] of the given slots; a view when the slots are consecutive."""
        first = slots[0]
        if list(slots) == list(range(first, first + len(slots))):
            end = first + len(slots)
            return self.k[layer, first:end, :tokens].transpose(1, 2), self.v[layer, first:end, :tokens].transpose(1, 2)
        return self.gather(layer, slot_index, tokens)

    def gather(self, layer: int, slot_index: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, kv_heads, tokens, head_dim] of the slots in ``slot_index``, always a copy (graph-safe)."""
        return self.k[layer][slot_index, :tokens].transpose(1, 2), self.v[layer][slot_index, :tokens].transpose(1, 2)


@dataclass(frozen=True)
class DecisionBucket:
    """The static shape (and graph key) of a padded cached forward: rows and suffix tokens."""

    batch: int
    length: int


class CompactLM:
    """Embedding-in, post-norm-hidden-out forward of a transformers ``Qwen2Model``'s weights.

    ``cuda_graphs``: cached forwards of at most ``max_graph_batch`` rows and ``max_graph_length`` suffix tokens take
    the static-shape path (CUDA graphs on a GPU, the same padded code eagerly elsewhere); off with False or
    ``DISPIDER_CUDA_GRAPHS=0``.
    """

    def __init__(self, language_model: Qwen2Model, *, fused: bool = True, cuda_graphs: bool = True,
                 max_graph_batch: int = 16, max_graph_length: int = 256, fp8: bool = False):
        config = language_model.config
        rope = getattr(config, "rope_parameters", None) or {"rope_type": "default",
                                                             "rope_theta": getattr(config, "rope_theta", 1e4)}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"only default RoPE is supported, not {rope['rope_type']!r}")
        self.model = language_model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.hidden_size = config.hidden_size
        self.scaling = self.head_dim**-0.5
        self.max_positions = int(config.max_position_embeddings)
        weight = language_model.embed_tokens.weight
        self.device, self.dtype = weight.device, weight.dtype
        # Kept in fp32 whatever the model dtype, as transformers does.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=self.device) / self.head_dim
        self.inv_freq = 1.0 / (float(rope["rope_theta"]) ** exponents)
        self.fused = fused and kernels.fused_ops_available()  # False: the plain-torch baseline
        self.rotary = kernels.Rotary(self.inv_freq, self.head_dim, self.dtype, fused=self.fused)
        self.silu_gate = getattr(config, "hidden_act", "silu") == "silu"
        self.eps = float(getattr(config, "rms_norm_eps", 1e-6))
        self._qkv = [kernels.merged_linear(layer.self_attn, "_dispider_qkv", [layer.self_attn.q_proj,
                     layer.self_attn.k_proj, layer.self_attn.v_proj]) for layer in language_model.layers]
        self._gate_up = [kernels.merged_linear(layer.mlp, "_dispider_gate_up", [layer.mlp.gate_proj,
                         layer.mlp.up_proj]) for layer in language_model.layers]
        self._o_proj = [layer.self_attn.o_proj for layer in language_model.layers]
        self._down_proj = [layer.mlp.down_proj for layer in language_model.layers]
        self.fp8 = fp8  # the four matmuls of each layer with FP8 weights (dispider_vllm/fp8.py)
        if fp8:
            for linears in (self._qkv, self._gate_up, self._o_proj, self._down_proj):
                linears[:] = [fp8_linear(linear) for linear in linears]
        self.cuda_graphs = cuda_graphs_enabled(cuda_graphs) and max_graph_batch > 0
        self.graph_shapes = StaticShapes(max_batch=max_graph_batch if self.cuda_graphs else 0,
                                         length_multiple=32, max_length=max_graph_length)
        self.graphs = GraphCache(self.device, enabled=self.cuda_graphs)
        self.paged = kernels.paged_attention_available(self.device, self.dtype)  # else masked SDPA over a copy

    # ---- inputs -------------------------------------------------------------------------------------------
    def embed(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Embedding rows [len(ids), H] of token ids."""
        return self.embed_many([ids])[0]

    def embed_many(self, id_lists: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Embedding rows of several id lists, looked up in one go (one host-to-device copy, no sync)."""
        lengths = [len(ids) for ids in id_lists]
        flat = self.to_device([int(i) for ids in id_lists for i in ids])
        return list(self.model.embed_tokens(flat).split(lengths))

    def to_device(self, values: Sequence[int]) -> torch.Tensor:
        """A long tensor of ``values`` on the model's device. From pinned memory the copy is asynchronous, where a
        plain ``torch.tensor(..., device=cuda)`` would wait for every kernel already queued."""
        host = torch.tensor(values, dtype=torch.long)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def pool_bytes(self, *, slots: int, capacity: int) -> int:
        """What :meth:`new_pool` of ``slots`` streams and ``capacity`` positions allocates, K and V."""
        shape = KVPool.shape(len(self.model.layers), self.num_kv_heads, self.head_dim, slots=slots, capacity=capacity)
        return 2 * math.prod(shape) * self.dtype.itemsize

    def new_pool(self, **kwargs) -> KVPool:
        return KVPool(len(self.model.layers), self.num_kv_heads, self.head_dim, dtype=self.dtype,
                      device=self.device, **kwargs)

    # ---- forwards -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, sequences: Sequence[torch.Tensor]) -> torch.Tensor:
        """Uncached causal forward of each sequence [L_i, H] from position 0 -> hidden [B, max L, H].

        Rows are right-padded; causal attention alone keeps every real token off the padding after it, so no mask
        is needed (this is the flash-attention path on a GPU). Hidden states at padded positions are garbage.
        """
        embeds, _ = self._pad(sequences)
        return self.forward_padded(embeds)

    def forward_padded(self, embeds: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` of rows already right-padded into one tensor [B, L, H] (model dtype and device).

        ``embeds`` is consumed: the fused residual add works in place on it. No host synchronisation, so a CUDA
        graph can capture it.
        """
        batch, length, _ = embeds.shape
        positions = torch.arange(length, device=self.device).expand(batch, length)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k, v = (x.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1) for x in (k, v))
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)

        with self._backends(causal=True):
            return self._run_layers(embeds, positions, attend, max_position=length - 1)

    @torch.inference_mode()
    def forward_cached(self, pool: KVPool, slots: Sequence[int], suffixes: Sequence[torch.Tensor],
                       keep: Sequence[int]) -> torch.Tensor:
        """Run each slot's suffix [L_b, H] after its cached prefix -> hidden [B, max L, H] of the suffixes.

        Then commit the K/V of the first ``keep[b]`` suffix tokens of row b to its slot; the rest is forgotten.
        Small batches take the static-shape (graph) path; the result is the same (see the module docstring).
        """
        lengths = self._check_cached_batch(pool, slots, suffixes, keep)
        prefix_lengths = [pool.length(s) for s in slots]
        bucket = self.decision_bucket(len(slots), max(lengths), max(prefix_lengths))
        if bucket is None:
            hidden = self._forward_cached_eager(pool, slots, suffixes, prefix_lengths)
        else:
            hidden = self._forward_cached_static(pool, slots, suffixes, prefix_lengths, bucket)
        for slot, kept in zip(slots, keep):
            pool.lengths[slot] += int(kept)
        return hidden

    @torch.inference_mode()
    def capture_cached_graphs(self, pool: KVPool, *, without_graphs: bool = False) -> int:
        """Capture the cached forward's graph of every bucket (rows x suffix length) now, on slots borrowed from
        ``pool`` and given back, committing nothing; returns the graphs alive. ``without_graphs``: run the passes
        even where nothing is captured (the CPU tests of this warm-up)."""
        if not (self.graphs.graphed or without_graphs):
            return 0
        rows = self.graph_shapes.batch_buckets()
        slots = [pool.allocate() for _ in range(max(rows))]  # all first: a growth now would drop captures
        try:
            for length in self.graph_shapes.length_buckets():
                suffix = torch.zeros(length, self.hidden_size, dtype=self.dtype, device=self.device)
                for count in rows:
                    self.forward_cached(pool, slots[:count], [suffix] * count, [0] * count)
        finally:
            for slot in slots:
                pool.release(slot)
        return len(self.graphs)

    def decision_bucket(self, batch: int, length: int, longest_prefix: int) -> DecisionBucket | None:
        """The static shape a cached forward of ``batch`` rows of at most ``length`` suffix tokens runs in, or None
        when it runs eagerly (graphs off, too many rows, too long a suffix, or past the position limit)."""
        rows, tokens = self.graph_shapes.batch(batch), self.graph_shapes.length(length)
        if rows is None or tokens is None or longest_prefix + tokens > self.max_positions:
            return None
        return DecisionBucket(rows, tokens)

    def _check_cached_batch(self, pool: KVPool, slots: Sequence[int], suffixes: Sequence[torch.Tensor],
                            keep: Sequence[int]) -> list[int]:
        if len(set(slots)) != len(slots):
            raise ValueError("a slot may appear once per batch")
        lengths = [int(s.shape[0]) for s in suffixes]
        if not lengths or min(lengths) == 0:
            raise ValueError("every sequence needs at least one token")
        if any(k > n for k, n in zip(keep, lengths)):
            raise ValueError("cannot keep more tokens than a suffix has")
        total = max(pool.length(s) for s in slots) + max(lengths)
        if total > self.max_positions:
            raise ValueError(f"a decision sequence of {total} positions exceeds {self.max_positions}")
        return lengths

    def _forward_cached_eager(self, pool: KVPool, slots: Sequence[int], suffixes: Sequence[torch.Tensor],
                              prefix_lengths: Sequence[int]) -> torch.Tensor:
        embeds, _ = self._pad(suffixes)
        length = embeds.shape[1]
        total = max(prefix_lengths) + length
        pool.reserve(total)
        prefix = self.to_device(list(prefix_lengths))
        positions = prefix[:, None] + torch.arange(length, device=self.device)[None, :]
        slot_index = self.to_device(list(slots))
        attend = self._cached_attention(pool, slot_index, positions, total,
                                        read=lambda layer: pool.read(layer, slots, slot_index, total))
        with self._backends(causal=False):
            return self._run_layers(embeds, positions, attend, max_position=total - 1)

    def _forward_cached_static(self, pool: KVPool, slots: Sequence[int], suffixes: Sequence[torch.Tensor],
                               prefix_lengths: Sequence[int], bucket: DecisionBucket) -> torch.Tensor:
        """The padded batch through the bucket's graph -> hidden [B, max L, H] of the real rows (a copy: the
        graph's output is overwritten by its next replay)."""
        pool.reserve(max(prefix_lengths) + bucket.length)  # may grow the pool: before binding the graphs to it
        scratch = pool.scratch_slot()
        self.graphs.bind(pool.k, pool.v, self.rope_table())
        static = self.graphs.inputs(bucket, lambda: self._decision_inputs(bucket))
        for row, suffix in enumerate(suffixes):
            static["embeds"][row, : len(suffix)].copy_(suffix)
        padding = bucket.batch - len(slots)
        rows = torch.tensor([[*prefix_lengths, *[0] * padding], [*slots, *[scratch] * padding]], dtype=torch.long)
        copy_from_host(static["rows"], rows)
        hidden = self.graphs.run(bucket, lambda inputs: self._decision_pass(pool, inputs))
        return hidden[: len(slots), : max(len(s) for s in suffixes)].clone()

    def _decision_inputs(self, bucket: DecisionBucket) -> dict[str, torch.Tensor]:
        """Static inputs of a padded cached forward: suffix embeddings, and per row its prefix length and slot."""
        return {"embeds": torch.zeros(bucket.batch, bucket.length, self.hidden_size, dtype=self.dtype,
                                      device=self.device),
                "rows": torch.zeros(2, bucket.batch, dtype=torch.long, device=self.device)}

    def _decision_pass(self, pool: KVPool, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The graph body: every row against the pool's whole capacity, K/V gathered by slot index."""
        embeds, prefix, slot_index = inputs["embeds"], inputs["rows"][0], inputs["rows"][1]
        length, capacity = embeds.shape[1], pool.capacity
        positions = prefix[:, None] + torch.arange(length, device=self.device)[None, :]
        attend = self._cached_attention(pool, slot_index, positions, capacity,
                                        read=lambda layer: pool.gather(layer, slot_index, capacity))
        with self._backends(causal=False):
            # On a copy: the fused residual add works in place, and the static input must survive warm-up runs.
            return self._run_layers(embeds.clone(), positions, attend,
                                    max_position=min(capacity, self.max_positions) - 1)

    def _cached_attention(self, pool: KVPool, slot_index: torch.Tensor, positions: torch.Tensor, keys: int,
                          read: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> AttendFn:
        """Attention of each row's suffix over the first ``keys`` positions of its slot, after writing the suffix's
        K/V there; ``read(layer)`` gives those K/V (the masked path's; the paged path reads the pool in place)."""
        if self.paged and pool.capacity % PAGE_MULTIPLE == 0:
            return self._paged_attention(pool, slot_index, positions, keys)
        batch, length = positions.shape
        # Key j is visible to the query at position p iff j <= p: the row's prefix plus its suffix so far.
        visible = torch.arange(keys, device=self.device)[None, None, :] <= positions[:, :, None]
        groups = self.num_heads // self.num_kv_heads
        mask = self._additive_mask(visible, groups)

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            pool.write(layer, slot_index, positions, k, v)
            keys_, values = read(layer)
            folded = q.reshape(batch, self.num_kv_heads, groups * length, self.head_dim)
            out = F.scaled_dot_product_attention(folded, keys_, values, attn_mask=mask, scale=self.scaling)
            return out.reshape(batch, self.num_heads, length, self.head_dim)

        return attend

    def _paged_attention(self, pool: KVPool, slot_index: torch.Tensor, positions: torch.Tensor,
                         keys: int) -> AttendFn:
        """As ``_cached_attention``, with FlashAttention reading each row's slot in place as its one page: row b
        sees its prefix and its (padded) suffix, ``positions[b, -1] + 1`` keys, never the rest of the capacity."""
        batch, length = positions.shape
        key_lengths = (positions[:, -1] + 1).to(torch.int32)
        query_starts = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=self.device)
        pages = slot_index.to(torch.int32)[:, None]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            pool.write(layer, slot_index, positions, k, v)
            packed = q.transpose(1, 2).reshape(batch * length, self.num_heads, self.head_dim)
            out = kernels.paged_attention(packed, pool.k[layer], pool.v[layer], query_starts=query_starts,
                                          query_length=length, key_lengths=key_lengths, max_keys=keys, pages=pages,
                                          scale=self.scaling)
            return out.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        return attend

    def rope_table(self) -> torch.Tensor:
        """The RoPE table sized for every position the model allows, so that it never regrows under a graph."""
        return self.rotary.cos_sin(self.max_positions)

    # ---- internals ----------------------------------------------------------------------------------------
    def _backends(self, *, causal: bool):
        """On a GPU: flash for causal passes; memory-efficient for masked ones (cuDNN re-plans every new shape,
        which cost more host time than the whole decision step's GPU time)."""
        if self.device.type != "cuda":
            return nullcontext()
        if causal:
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
        return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _additive_mask(self, visible: torch.Tensor, groups: int) -> torch.Tensor:
        """visible [B, L, P] -> an additive mask [B, 1, groups*L, P] in the model dtype, built once per forward.

        GQA without repeating K/V: the query heads of one KV head are folded into the query length (row r*L + i is
        query i of the r-th head of the group). Rows are allocated 16-aligned, as the memory-efficient kernel
        wants them, so it need not copy the mask in every layer.
        """
        batch, length, total = visible.shape
        width = -(-total // 16) * 16
        mask = torch.full((batch, 1, groups * length, width), float("-inf"), dtype=self.dtype, device=self.device)
        mask = mask[..., :total]
        return mask.masked_fill_(visible.repeat(1, groups, 1)[:, None], 0.0)

    def _pad(self, sequences: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
        lengths = [int(s.shape[0]) for s in sequences]
        if not lengths or min(lengths) == 0:
            raise ValueError("every sequence needs at least one token")
        embeds = torch.zeros(len(sequences), max(lengths), self.hidden_size, dtype=self.dtype, device=self.device)
        for row, sequence in enumerate(sequences):
            embeds[row, : lengths[row]] = sequence.to(device=self.device, dtype=self.dtype)
        return embeds, lengths

    def _run_layers(self, embeds: torch.Tensor, positions: torch.Tensor, attend: AttendFn, *,
                    max_position: int) -> torch.Tensor:
        """The decoder layers; ``max_position`` bounds ``positions`` (known on the host: no read-back)."""
        batch, length, _ = embeds.shape
        flat_positions = positions.reshape(-1)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layers = self.model.layers
        # The residual stream and the normed input of the next sublayer, updated together (one fused kernel).
        residual = embeds
        normed = kernels.rms_norm(embeds, layers[0].input_layernorm.weight, self.eps, fused=self.fused)
        for index, layer in enumerate(layers):
            qkv = self._qkv[index](normed)
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            self.rotary.apply_(flat_positions, q.view(batch * length, q_size), k.view(batch * length, kv_size),
                               max_position=max_position)
            q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
            k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
            out = attend(index, q, k, v).transpose(1, 2).reshape(batch, length, q_size)
            normed, residual = kernels.add_rms_norm(self._o_proj[index](out), residual,
                                                    layer.post_attention_layernorm.weight, self.eps, fused=self.fused)
            next_norm = layers[index + 1].input_layernorm if index + 1 < len(layers) else self.model.norm
            normed, residual = kernels.add_rms_norm(self._mlp(index, layer, normed), residual, next_norm.weight,
                                                    self.eps, fused=self.fused)
        return normed

    def _mlp(self, index: int, layer, normed: torch.Tensor) -> torch.Tensor:
        if not self.silu_gate:
            return layer.mlp(normed)
        gate_up = self._gate_up[index](normed)
        return self._down_proj[index](kernels.silu_and_mul(gate_up, fused=self.fused))
