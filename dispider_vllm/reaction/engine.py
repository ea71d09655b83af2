"""The reaction engine: vLLM's async engine serving the reaction model, one streamed answer per trigger.

    engine = ReactionEngine(ReactionEngineConfig(model_dir=reaction_dir))
    await engine.start()
    async for delta in engine.respond(trigger, max_tokens=128, temperature=0.0, stop=None, previous_answers=()):
        ...
    engine.shutdown()

An answer is streamed as :class:`ReactionDelta` s (DISPIDER.md section 4): generation stops at ``<|im_end|>``,
special tokens are skipped in the text, and a model that says ``<keep_silent>`` first, or says nothing, is
silent: ``respond`` then yields one finished delta with ``finish_reason == "silent"`` and no text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from dispider_vllm.reaction.prompt import build_reaction_prompt
from dispider_vllm.types import Trigger

log = logging.getLogger(__name__)

SILENT = "silent"  # finish_reason of an answer the model declined to give


@dataclass(frozen=True)
class ReactionDelta:
    """A piece of one streamed answer.

    ``text`` is the new text (leading whitespace of the answer removed); ``num_tokens`` counts the answer's
    generated tokens so far; the last delta has ``finished`` set and a ``finish_reason``: "stop", "length",
    "abort" or "silent".
    """

    text: str
    num_tokens: int
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0


@dataclass(frozen=True)
class ReactionTokenIds:
    """The token ids the engine needs, from the reaction part's ``config.json``."""

    image: int
    keep_silent: int | None
    im_end: int | None

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike) -> ReactionTokenIds:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        return cls(
            image=int(config["image_token_id"]),
            keep_silent=_optional_int(config.get("keep_silent_token_id")),
            im_end=_optional_int(config.get("im_end_token_id")),
        )


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


@dataclass
class ReactionEngineConfig:
    model_dir: str  # the checkpoint's reaction part (see dispider_vllm.checkpoint.split)
    dtype: str = "auto"  # "float32" on the CPU
    max_model_len: int | None = 16384  # 4 clips (4352) + global memory + prompt + earlier answers, with room
    max_num_seqs: int | None = None
    # Prompt tokens one engine step takes (the prefill chunk); None: vLLM's default for this engine, 2048.
    # (The server asks for 8192 on a GPU: serve.app.reaction_batched_tokens.)
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    disable_custom_all_reduce: bool = False  # tensor parallelism over NCCL only
    cpu_kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE, when running on the CPU
    scheduling_policy: str = "fcfs"  # or "priority": then ``respond(priority=...)`` orders requests
    # Under CUDA MPS, on a GPU shared with the sidecar: "below_normal" lets perception and decision go first.
    mps_client_priority: str = "below_normal"  # or "normal"; without an MPS daemon it does nothing
    quantization: str | None = None  # "fp8": vLLM's online dynamic FP8 of the bf16 weights (GPU only)
    # The decision gate's shared-memory name (dispider_vllm/decision_gate.py): each engine step then waits while
    # the sidecar decides closed clips, at most ``decision_gate_ms``. None: steps never wait.
    decision_gate: str | None = None
    decision_gate_ms: float = 0.0
    seed: int = 0


class ReactionEngine:
    """Owns one ``AsyncLLM`` for the reaction model; ``respond`` streams one answer per trigger."""

    def __init__(self, config: ReactionEngineConfig) -> None:
        self.config = config
        self.token_ids = ReactionTokenIds.from_model_dir(config.model_dir)
        self._spellable_ids = _spellable_ids_with_dummy_weights(config.model_dir)
        self._llm = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Build the engine (it spawns its own engine-core process) and wait until it takes requests."""
        from vllm.v1.engine.async_llm import AsyncLLM

        _prepare_cpu_environment(self.config)
        _set_mps_client_priority(self.config)
        _set_decision_gate(self.config)
        args = self.engine_args()
        # Blocks until the engine core is up (minutes on the CPU); called in a running loop, it also starts
        # the output handler, so a dead engine core shows in ``is_alive`` before any request.
        self._llm = AsyncLLM.from_engine_args(args)

    def engine_args(self):
        """vLLM's ``AsyncEngineArgs`` for this configuration."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        return AsyncEngineArgs(
            model=self.config.model_dir,
            # A shapes-only split (dispider_vllm.checkpoint.dummy) has no weights: vLLM fills them at random.
            load_format="dummy" if _has_dummy_weights(self.config.model_dir) else "auto",
            dtype=self.config.dtype,
            quantization=self.config.quantization,
            max_model_len=self.config.max_model_len,
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            gpu_memory_utilization=self.config.gpu_memory_utilization,
            tensor_parallel_size=self.config.tensor_parallel_size,
            enforce_eager=self.config.enforce_eager,
            disable_custom_all_reduce=self.config.disable_custom_all_reduce,
            scheduling_policy=self.config.scheduling_policy,
            scheduler_cls=GATED_SCHEDULER if self.config.decision_gate else None,
            seed=self.config.seed,
            # Answers of one stream share their system prompt and, with the same retrieved clips, their bundle.
            enable_prefix_caching=True,
            enable_chunked_prefill=True,
            limit_mm_per_prompt={"image": 1},
            disable_log_stats=True,
        )

    def shutdown(self) -> None:
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None

    def is_alive(self) -> bool:
        return self._llm is not None and not self._llm.errored

    def features(self) -> dict | None:
        """What the started engine runs with, vLLM's defaults resolved (None before ``start``)."""
        if self._llm is None:
            return None
        scheduler = self._llm.vllm_config.scheduler_config
        return {"max_num_batched_tokens": scheduler.max_num_batched_tokens, "max_num_seqs": scheduler.max_num_seqs,
                "max_model_len": self._llm.model_config.max_model_len, "quantization": self.config.quantization,
                "mps_client_priority": self.config.mps_client_priority,
                "decision_gate_ms": self.config.decision_gate_ms if self.config.decision_gate else None}

    # -- answers ------------------------------------------------------------------------------------------
    def sampling_params(self, *, max_tokens: int, temperature: float, stop: Sequence[str] | None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            stop=list(stop) if stop else None,
            stop_token_ids=[self.token_ids.im_end] if self.token_ids.im_end is not None else None,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA,
            allowed_token_ids=self._spellable_ids,
        )

    async def respond(
        self,
        trigger: Trigger,
        *,
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None,
        previous_answers: Sequence[str],
        priority: int = 0,
    ) -> AsyncIterator[ReactionDelta]:
        """Stream the answer to one trigger. Closing the iterator early (a client gone) aborts the request.

        A bad clip bundle raises a ``ValueError`` (``BundleError``) before anything is yielded.
        """
        if self._llm is None:
            raise RuntimeError("the reaction engine is not started")
        request = {
            "prompt": build_reaction_prompt(trigger.question, previous_answers),
            "multi_modal_data": {"image": trigger.bundle.as_mm_data()},
            # A trigger names its bundle, so vLLM keys its caches on the name instead of hashing ~33 MB.
            "multi_modal_uuids": {"image": [bundle_name(trigger)]},
        }
        params = self.sampling_params(max_tokens=max_tokens, temperature=temperature, stop=stop)
        outputs = self._llm.generate(request, params, f"reaction-{uuid.uuid4().hex}", priority=priority)
        # aclosing: leaving the loop early must close vLLM's generator now, which aborts the request.
        async with contextlib.aclosing(outputs):
            async for delta in answer_deltas(outputs, self.token_ids.keep_silent):
                yield delta


async def answer_deltas(outputs: AsyncIterator, keep_silent_id: int | None) -> AsyncIterator[ReactionDelta]:
    """vLLM's delta outputs -> answer deltas, holding text back until the answer is known not to be silent."""
    held = ""  # whitespace seen before the first visible character
    started = False
    num_tokens = prompt_tokens = 0
    async for output in outputs:
        if output.prompt_token_ids is not None:
            prompt_tokens = len(output.prompt_token_ids)
        completion = output.outputs[0]
        if num_tokens == 0 and completion.token_ids and completion.token_ids[0] == keep_silent_id:
            yield ReactionDelta("", len(completion.token_ids), True, SILENT, prompt_tokens)
            return  # the rest is not wanted; the caller closing the generator aborts it
        num_tokens += len(completion.token_ids)
        text = completion.text
        if not started:
            held += text
            text, started = held.lstrip(), bool(held.strip())
        finished = completion.finish_reason is not None
        if finished and not started:
            yield ReactionDelta("", num_tokens, True, SILENT, prompt_tokens)
            return
        if text or finished:
            yield ReactionDelta(text, num_tokens, finished, completion.finish_reason, prompt_tokens)


def bundle_name(trigger: Trigger) -> str:
    """Unique per bundle content: a stream answers a question at a clip once, from these retrieved clips."""
    event = trigger.event
    clips = ",".join(map(str, trigger.retrieved))
    return f"{event.stream_id}/q{event.question_id}/c{event.clip_index}/r{clips}/t{trigger.bundle.global_memory.shape[0]}"


def _spellable_ids_with_dummy_weights(model_dir: str) -> list[int] | None:
    """With dummy weights over the real 152k vocabulary and the small stand-in tokenizer, nearly every sampled id
    would decode to nothing, so every answer would count as silent; a benchmark then limits sampling to the ids
    the tokenizer can spell (never ``<keep_silent>``). Real checkpoints sample freely (None)."""
    if not _has_dummy_weights(model_dir):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    special = set(tokenizer.all_special_ids)
    return [i for i in range(min(len(tokenizer), config["vocab_size"])) if i not in special]


def _has_dummy_weights(model_dir: str) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return bool(config.get("dispider_dummy_weights"))


MPS_CLIENT_PRIORITIES = {"normal": "0", "below_normal": "1"}  # CUDA_MPS_CLIENT_PRIORITY's values


def _set_mps_client_priority(config: ReactionEngineConfig) -> None:
    """The engine-core process inherits this environment: under an MPS daemon its kernels queue behind those of
    normal-priority clients (the sidecar sets its own to normal), and without one CUDA ignores the variable."""
    os.environ["CUDA_MPS_CLIENT_PRIORITY"] = MPS_CLIENT_PRIORITIES[config.mps_client_priority]


GATED_SCHEDULER = "dispider_vllm.reaction.scheduler.gated_scheduler"


def _set_decision_gate(config: ReactionEngineConfig) -> None:
    """The engine-core process inherits these: its scheduler (``GATED_SCHEDULER``) attaches the gate by name."""
    from dispider_vllm.reaction.scheduler import GATE_ENV, LIMIT_ENV

    if config.decision_gate:
        os.environ[GATE_ENV] = config.decision_gate
        os.environ[LIMIT_ENV] = str(config.decision_gate_ms)


def _prepare_cpu_environment(config: ReactionEngineConfig) -> None:
    """On the CPU, keep the KV cache small unless the operator chose a size (read by vLLM's workers)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gib))
