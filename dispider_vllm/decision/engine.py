"""Decision for many live streams at once: trigger logits, summaries, retrieval and clip bundles.

Per clip of every stream (DISPIDER.md sections 3-4):
  - decision: one forward of [pending, M_t, Q, TODO] against the stream's cached prefix (see
    :mod:`.context`); ``silent_head`` on the TODO state gives the logit, > 0 means respond. The clips of all streams
    that arrived in a :meth:`DecisionEngine.step` are decided in one batched forward per round (round r takes the
    r-th new clip of each stream).
  - on a trigger at clip t: q = that TODO state; sim_j = cos(q, T_j) over the kept clips; the top min(4, n) clips,
    chronological; global memory G = the summary pass over [M_1..M_t, T_1..T_t]; the decision summary S over the
    window; then the stream's context becomes [..., S, ANS]. The summary passes of all streams that triggered in a
    round share padded batches.

A new question (:meth:`DecisionEngine.ask`) starts a fresh decision sequence [ANS][Q'] from the next clip on: the
decision for Q' sees neither the earlier clips' M nor the summaries made for the earlier question, since Dispider
scores a question against what has happened since it was asked (``insert_position``). Earlier clips stay
retrievable and stay in G, so the answer can still use them.

State kept per stream, and its size at real shapes (16-bit, 16-s clips, 225 clips an hour):
  - per kept clip: raw [1024, 4096] (8,388,608 B, host memory), M [64, 1536] (196,608 B) and T [1536] (3,072 B),
    8.59 MB a clip, so 1.93 GB per hour of video (45 MB of it on the GPU) up to ``max_kept_clips`` clips
    (225 by default: about 1.9 GB a stream); retrieval and G only see kept clips.
  - the KV cache of the decision prefix: 28 layers x 2 x 2 KV heads x 128 x 2 B = 28,672 B a token;
    (1 + |Q|) + sum over triggers of (clips in S + 1) + 64 x window tokens. The window is at most
    ``max_context_clips`` (64 by default: 4,096 tokens, 117 MB); the summaries add one token a clip plus one a
    trigger (at most 450 tokens, 13 MB, an hour).
  So bytes(hour) ~= 225 x 8.59 MB + 28,672 B x (1 + |Q| + 225 + triggers + 64 x window clips). The KV pool
  reserves the same capacity for every slot (the largest stream's prefix + one suffix), see ``kv_pool_bytes``.
  The decision window keeps only M and T of its clips (no raw): raw lives in the kept clips alone.

Budget of the kept clips, over all streams (``kept_clips_budget_bytes``): 576 streams x 32 clips x 8.59 MB is
158 GB of host memory, more than a host may have. After the clips of a round are kept, while their bytes (raw + M + T
of every stream's kept clips) are over the budget, the oldest kept clip of the stream holding the most kept clips is
evicted (ties: the stream opened first), never taking a stream below ``top_k`` clips; when even that cannot meet the
budget, the engine stays over it and logs one warning. Retrieval and G see the kept clips that are left.
"""

from __future__ import annotations

import heapq
import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from ..perception.modules import PerceptionDecisionModules
from ..types import FRAMES_PER_CLIP, ClipBundle, ClipFeatures, DecisionEvent, Trigger
from .compact_lm import CompactLM, KVPool
from .context import DecisionContext

log = logging.getLogger("dispider.decision")

ANS_TOKEN = "<has_answer>"
TODO_TOKEN = "<to_do>"

# (stream_id, clip_index) -> True (respond), False (stay silent) or None (follow the logit).
ForceRespond = Callable[[str, int], "bool | None"]


@dataclass
class DecisionConfig:
    max_kept_clips: int = 225  # clips whose raw/M/T are kept for retrieval and G (an hour of 16-s clips)
    max_context_clips: int | None = 64  # window of unanswered clips in the decision sequence; None = unbounded
    context_keep_clips: int | None = None  # window size right after a rebuild; None = max_context_clips // 2
    # All streams' kept clips together (raw + M + T bytes); past it the streams with the most kept clips lose their
    # oldest, down to top_k each (see the module docstring). None: unbounded (only max_kept_clips per stream).
    kept_clips_budget_bytes: int | None = None
    top_k: int = 4  # retrieved clips per trigger: min(top_k, kept clips)
    bundle_device: str = "cpu"  # where ClipBundle tensors are put for the reaction
    max_streams_per_forward: int = 64  # decision rows per batched forward
    max_summary_tokens: int = 65_536  # padded tokens per batched summary forward
    # The KV pool starts with this many slots of this many tokens and grows on demand (a growth copies the pool,
    # briefly doubling it): a sidecar that knows its stream count and window can size it from the start.
    initial_kv_slots: int = 4
    initial_kv_tokens: int = 1024
    # Bytes the pool may take at the start (None: no limit); a larger pool is refused before it is allocated.
    kv_memory_budget_bytes: int | None = None
    # Decision forwards of at most max_graph_batch streams run padded to a bucket, replayed from CUDA graphs on a
    # GPU (compact_lm's module docstring); DISPIDER_CUDA_GRAPHS=0 turns them off too. Unused when an lm is passed.
    cuda_graphs: bool = True
    max_graph_batch: int = 16
    fp8: bool = False  # the compact LM's matmuls with FP8 weights (dispider_vllm/fp8.py); unused when an lm is passed

    def __post_init__(self) -> None:
        if self.max_context_clips is not None:
            if self.max_context_clips < 1:
                raise ValueError("max_context_clips must be at least 1")
            if self.context_keep_clips is None:
                self.context_keep_clips = max(1, self.max_context_clips // 2)
            if not 1 <= self.context_keep_clips <= self.max_context_clips:
                raise ValueError("context_keep_clips must be in [1, max_context_clips]")
        if self.max_kept_clips < 1:
            raise ValueError("max_kept_clips must be at least 1")
        if self.kept_clips_budget_bytes is not None and self.kept_clips_budget_bytes < 1:
            raise ValueError("kept_clips_budget_bytes must be at least 1 (None: unbounded)")
        if self.top_k < 1:
            raise ValueError("top_k must be at least 1")
        if self.max_graph_batch < 0:
            raise ValueError("max_graph_batch must be at least 0")


@dataclass
class _Stream:
    stream_id: str
    slot: int
    context: DecisionContext
    clips: deque[ClipFeatures]
    question_count: int = 1
    last_clip_index: int | None = None
    kept_bytes: int = 0  # of ``clips``


@dataclass(frozen=True)
class KeptClipsUsage:
    """What the kept clips of all open streams hold now, against the budget."""

    clips: int
    bytes: int
    evicted_total: int  # clips evicted to stay within the budget since the engine started (not the per-stream cap)
    budget_bytes: int | None  # None: unbounded


@dataclass
class _Decided:
    """A clip that was decided in this round and said respond."""

    stream: _Stream
    clip: ClipFeatures
    event: DecisionEvent
    query: torch.Tensor  # the TODO hidden state [H]
    position: int  # in the round's results


class KVPoolTooLarge(ValueError):
    """The KV pool asked for at the start would not fit in the memory it was given."""

    def __init__(self, slots: int, pool_bytes: int, budget_bytes: int) -> None:
        super().__init__(f"the decision KV caches of {slots} streams take {pool_bytes / 2**30:.1f} GiB up front "
                         f"({pool_bytes / (slots + 1) / 2**20:.1f} MiB a stream), more than the "
                         f"{max(budget_bytes, 0) / 2**30:.1f} GiB there is for them")
        self.slots, self.pool_bytes, self.budget_bytes = slots, pool_bytes, budget_bytes


class DecisionEngine:
    """Decides every new clip of every open stream, batched; see the module docstring."""

    def __init__(self, modules: PerceptionDecisionModules, config: DecisionConfig | None = None, *,
                 force_respond: ForceRespond | None = None, lm: CompactLM | None = None):
        self.modules = modules
        self.config = config or DecisionConfig()
        self.force_respond = force_respond
        self.lm = lm or CompactLM(modules.language_model, cuda_graphs=self.config.cuda_graphs,
                                  max_graph_batch=self.config.max_graph_batch, fp8=self.config.fp8)
        self._check_pool_fits()
        self.pool: KVPool = self.lm.new_pool(slots=self.config.initial_kv_slots,
                                             capacity=self.config.initial_kv_tokens)
        with torch.inference_mode():
            self._ans = self.lm.embed(modules.token_ids(ANS_TOKEN))
            self._todo = self.lm.embed(modules.token_ids(TODO_TOKEN))
        self._streams: dict[str, _Stream] = {}
        self._kept_bytes = 0  # over all streams' kept clips
        self._evicted_total = 0
        self._warned_over_budget = False  # one warning while the budget cannot be met, not one per round

    def _check_pool_fits(self) -> None:
        """Refuse a pool larger than ``kv_memory_budget_bytes`` before allocating it (an out-of-memory error deep in
        the start, or a GPU left without room for vLLM, would say less)."""
        budget = self.config.kv_memory_budget_bytes
        if budget is None:
            return
        slots = self.config.initial_kv_slots
        pool_bytes = self.lm.pool_bytes(slots=slots, capacity=self.config.initial_kv_tokens)
        if pool_bytes > budget:
            raise KVPoolTooLarge(slots, pool_bytes, budget)

    # ---- stream lifecycle ---------------------------------------------------------------------------------
    @property
    def stream_ids(self) -> list[str]:
        return list(self._streams)

    def open(self, stream_id: str, question: str) -> None:
        if stream_id in self._streams:
            raise KeyError(f"stream {stream_id!r} is already open")
        slot = self.pool.allocate()
        self._streams[stream_id] = _Stream(stream_id, slot, self._new_context(question, 0),
                                           deque(maxlen=self.config.max_kept_clips))

    def ask(self, stream_id: str, question: str) -> int:
        """Replace the stream's question from its next clip on; returns the new question id."""
        stream = self._stream(stream_id)
        self.pool.truncate(stream.slot, 0)
        stream.context = self._new_context(question, stream.question_count)
        stream.question_count += 1
        return stream.context.question_id

    def close(self, stream_id: str) -> None:
        stream = self._streams.pop(stream_id)
        self.pool.release(stream.slot)
        self._kept_bytes -= stream.kept_bytes

    def question(self, stream_id: str) -> str:
        return self._stream(stream_id).context.question

    # ---- deciding -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, features_by_stream: Mapping[str, Sequence[ClipFeatures]]) -> list[DecisionEvent | Trigger]:
        """Decide every new clip; one item per clip: a Trigger when it responded, else its DecisionEvent.

        Items come round by round (first new clip of each stream, then the second, ...), streams in slot order.
        """
        queues = {sid: list(clips) for sid, clips in features_by_stream.items() if clips}
        for sid, clips in queues.items():
            self._check_order(self._stream(sid), clips)
        results: list[DecisionEvent | Trigger] = []
        for round_index in range(max((len(q) for q in queues.values()), default=0)):
            batch = [(self._streams[sid], clips[round_index]) for sid, clips in queues.items()
                     if round_index < len(clips)]
            results += self._decide_round(sorted(batch, key=lambda item: item[0].slot))
        return results

    def _decide_round(self, batch: list[tuple[_Stream, ClipFeatures]]) -> list[DecisionEvent | Trigger]:
        for stream, _ in batch:
            self._bound_window(stream)
        with record_function("decision.forward"):
            queries = torch.cat([self._decide(batch[i : i + self.config.max_streams_per_forward])
                                 for i in range(0, len(batch), self.config.max_streams_per_forward)])
        logits = self.modules.silent_head(queries).float().squeeze(-1).tolist()
        results: list[DecisionEvent | Trigger] = []
        decided: list[_Decided] = []
        for (stream, clip), query, logit in zip(batch, queries, logits):
            stream.context.decided(_without_raw(clip))
            self._keep(stream, clip)
            stream.last_clip_index = clip.index
            event = DecisionEvent(stream.stream_id, stream.context.question_id, clip.index, clip.start, clip.end, logit)
            if self._responds(stream.stream_id, clip.index, logit):
                decided.append(_Decided(stream, clip, event, query, position=len(results)))
            results.append(event)
        self._evict_over_budget()
        with record_function("decision.triggers"):
            triggers = self._trigger(decided)
        for item, trigger in zip(decided, triggers):
            results[item.position] = trigger
        return results

    def _decide(self, batch: list[tuple[_Stream, ClipFeatures]]) -> torch.Tensor:
        """One batched decision forward -> the TODO hidden states [B, H]."""
        for stream, _ in batch:
            if self.pool.length(stream.slot) + _pending_tokens(stream.context) != stream.context.cached_length():
                raise RuntimeError(f"stream {stream.stream_id!r}: KV cache out of step with its context")
        suffixes, keep = zip(*(stream.context.suffix(clip) for stream, clip in batch))
        hidden = self.lm.forward_cached(self.pool, [s.slot for s, _ in batch], suffixes, keep)
        last = self.lm.to_device([len(s) - 1 for s in suffixes])
        return hidden[torch.arange(len(batch), device=hidden.device), last]

    def _responds(self, stream_id: str, clip_index: int, logit: float) -> bool:
        forced = self.force_respond(stream_id, clip_index) if self.force_respond else None
        return bool(forced) if forced is not None else logit > 0.0

    def _bound_window(self, stream: _Stream) -> None:
        context = stream.context
        if context.needs_rebuild(self.config.max_context_clips):
            self.pool.truncate(stream.slot, context.rebuild(self.config.context_keep_clips))

    # ---- kept clips and their budget ----------------------------------------------------------------------
    def _keep(self, stream: _Stream, clip: ClipFeatures) -> None:
        if len(stream.clips) == stream.clips.maxlen:
            self._forget_oldest(stream)  # the deque would drop it silently; its bytes go with it
        stream.clips.append(clip)
        stream.kept_bytes += clip_bytes(clip)
        self._kept_bytes += clip_bytes(clip)

    def _forget_oldest(self, stream: _Stream) -> None:
        oldest = stream.clips.popleft()
        stream.kept_bytes -= clip_bytes(oldest)
        self._kept_bytes -= clip_bytes(oldest)

    def _evict_over_budget(self) -> None:
        """Evict until the kept clips fit the budget, if they can; warn once while they cannot."""
        budget = self.config.kept_clips_budget_bytes
        if budget is None:
            return
        if self._kept_bytes > budget:
            self._evict_from_fullest(budget)
        if self._kept_bytes <= budget:
            self._warned_over_budget = False
        elif not self._warned_over_budget:
            self._warned_over_budget = True
            log.warning("kept clips hold %d bytes, over their budget of %d bytes, and none of the %d streams keeps "
                        "more than top_k=%d clips to evict: staying over the budget until streams close",
                        self._kept_bytes, budget, len(self._streams), self.config.top_k)

    def _evict_from_fullest(self, budget: int) -> None:
        """The oldest clip of the stream keeping the most, again and again, none below top_k, until within budget."""
        floor = self.config.top_k
        # Ties: the stream opened first (the dict keeps the order the streams were opened in).
        heap = [(-len(s.clips), order, s.stream_id) for order, s in enumerate(self._streams.values())
                if len(s.clips) > floor]
        heapq.heapify(heap)
        while self._kept_bytes > budget and heap:
            _, order, stream_id = heapq.heappop(heap)
            stream = self._streams[stream_id]
            self._forget_oldest(stream)
            self._evicted_total += 1
            if len(stream.clips) > floor:
                heapq.heappush(heap, (-len(stream.clips), order, stream_id))

    def kept_clips_usage(self) -> KeptClipsUsage:
        return KeptClipsUsage(clips=sum(len(s.clips) for s in self._streams.values()), bytes=self._kept_bytes,
                              evicted_total=self._evicted_total, budget_bytes=self.config.kept_clips_budget_bytes)

    @torch.inference_mode()
    def capture_graphs(self, *, without_graphs: bool = False) -> int:
        """Capture the decision forward's graph of every bucket now (rows x suffix length), on slots borrowed from
        the pool and given back, committing nothing; returns the graphs alive. A pool that grows later (more
        streams than ``initial_kv_slots``, or longer prefixes) drops them, and they are captured again on use.
        ``without_graphs``: run the passes even where nothing is captured (the CPU tests of this warm-up)."""
        return self.lm.capture_cached_graphs(self.pool, without_graphs=without_graphs)

    # ---- triggers -----------------------------------------------------------------------------------------
    def _trigger(self, decided: list[_Decided]) -> list[Trigger]:
        if not decided:
            return []
        rows = [item.stream.context.summary_clips() for item in decided] + [list(item.stream.clips)
                                                                             for item in decided]
        summaries = self.summarize(rows)
        triggers = []
        for item, summary, global_memory in zip(decided, summaries[: len(decided)], summaries[len(decided) :]):
            kept = list(item.stream.clips)
            chosen = self.retrieve(item.query, kept)
            bundle = self._bundle([kept[i] for i in chosen], global_memory)
            context = item.stream.context
            triggers.append(Trigger(event=item.event, question=context.question,
                                    retrieved=tuple(kept[i].index for i in chosen), bundle=bundle))
            self.pool.truncate(item.stream.slot, context.triggered(item.clip.index, summary, self._ans))
        return triggers

    def retrieve(self, query: torch.Tensor, clips: Sequence[ClipFeatures]) -> list[int]:
        """Positions (into ``clips``) of the top-k clips by cos(query, T_j), in chronological order."""
        indicators = torch.stack([clip.indicator for clip in clips]).float()
        similarity = F.cosine_similarity(query.float()[None], indicators, dim=-1)
        top = torch.topk(similarity, min(self.config.top_k, len(clips))).indices
        return sorted(top.tolist())

    def summarize(self, rows: Sequence[Sequence[ClipFeatures]]) -> list[torch.Tensor]:
        """Summary pass per row of clips: [M_1..M_r, T_1..T_r] from position 0 -> the last r states [r, H]."""
        sequences = [torch.cat([*(c.memory for c in clips), torch.stack([c.indicator for c in clips])])
                     for clips in rows]
        order = sorted(range(len(rows)), key=lambda i: len(sequences[i]))
        outputs: list[torch.Tensor | None] = [None] * len(rows)
        for chunk in _chunks_by_tokens(order, [len(s) for s in sequences], self.config.max_summary_tokens):
            hidden = self.lm.forward([sequences[i] for i in chunk])
            for row, i in enumerate(chunk):
                length, count = len(sequences[i]), len(rows[i])
                outputs[i] = hidden[row, length - count : length].clone()
        return outputs  # type: ignore[return-value]

    def _bundle(self, clips: Sequence[ClipFeatures], global_memory: torch.Tensor) -> ClipBundle:
        device = self.config.bundle_device
        return ClipBundle(raw=torch.stack([c.raw.to(device) for c in clips]),
                          memory=torch.stack([c.memory for c in clips]).to(device),
                          global_memory=global_memory.to(device))

    # ---- state --------------------------------------------------------------------------------------------
    def memory_bytes(self, stream_id: str) -> int:
        """Bytes a stream holds: its kept clips (raw, M, T; host and device), its committed KV and pending tokens."""
        stream = self._stream(stream_id)
        # A window clip shares M and T with the kept clip of its index (if still kept) and has no raw.
        clips = {c.index: c for c in [*stream.context.window, *stream.clips]}.values()
        kv_bytes = self.pool.length(stream.slot) * self.pool.bytes_per_token
        context_bytes = stream.context.tail.nbytes + sum(t.nbytes for t in stream.context.pending)
        return sum(clip_bytes(c) for c in clips) + kv_bytes + context_bytes

    def kv_pool_bytes(self) -> int:
        """Device bytes reserved by the shared KV pool (every slot at full capacity)."""
        return self.pool.nbytes

    def kept_clip_indices(self, stream_id: str) -> list[int]:
        return [c.index for c in self._stream(stream_id).clips]

    def cache_length(self, stream_id: str) -> int:
        return self.pool.length(self._stream(stream_id).slot)

    # ---- helpers ------------------------------------------------------------------------------------------
    def _new_context(self, question: str, question_id: int) -> DecisionContext:
        with torch.inference_mode():
            question_embeds = self.lm.embed(self.modules.token_ids(question + TODO_TOKEN))
        return DecisionContext.start(question, question_id, question_embeds, self._ans, self._todo)

    def _stream(self, stream_id: str) -> _Stream:
        try:
            return self._streams[stream_id]
        except KeyError:
            raise KeyError(f"stream {stream_id!r} is not open") from None

    @staticmethod
    def _check_order(stream: _Stream, clips: Sequence[ClipFeatures]) -> None:
        indices = [c.index for c in clips]
        previous = stream.last_clip_index
        if any(b <= a for a, b in zip(indices, indices[1:])) or (previous is not None and indices[0] <= previous):
            raise ValueError(f"stream {stream.stream_id!r}: clips must arrive in increasing index order")


def clip_bytes(clip: ClipFeatures) -> int:
    """What a kept clip holds: raw (host memory) + M + T."""
    return clip.raw.nbytes + clip.memory.nbytes + clip.indicator.nbytes


def clip_bytes_at_shapes(modules: PerceptionDecisionModules) -> int:
    """What one kept 16-frame clip holds at these modules' shapes and dtype (8.59 MB for the real model in 16-bit)."""
    itemsize = torch.empty((), dtype=modules.dtype).element_size()
    raw = FRAMES_PER_CLIP * modules.resolution * modules.raw_dim
    memory = FRAMES_PER_CLIP * modules.pool_num * modules.hidden_size
    return itemsize * (raw + memory + modules.hidden_size)


def _without_raw(clip: ClipFeatures) -> ClipFeatures:
    """The clip as the decision window keeps it: M and T only, so an evicted clip's raw is freed at once."""
    return replace(clip, raw=clip.raw.new_empty((0, *clip.raw.shape[1:])))


def _pending_tokens(context: DecisionContext) -> int:
    return sum(len(t) for t in context.pending)


def _chunks_by_tokens(order: Sequence[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Split rows (sorted by length) into batches whose padded size (rows x longest) stays within budget."""
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= budget:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks
