"""The server's settings (one dataclass, filled by the CLI) and where its two model parts come from."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dispider.serve")

DEFAULT_MODEL_NAME = "dispider"
KEPT_CLIPS_HOST_MEMORY_SHARE = 0.4  # the kept clips' default budget: this share of the host's (or container's) memory


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def frontend_features(http: str = "auto", decode_frames_in: str = "sidecar") -> dict[str, str | float]:
    """The HTTP parser and event loop uvicorn runs with for ``--http`` (its "auto" takes the C ones when installed:
    httptools and uvloop; otherwise the pure-Python h11 and asyncio's loop), this process's GIL switch interval
    (``--switch-interval``) and where pushed images are decoded (``--decode-frames-in``)."""
    parser = ("httptools" if installed("httptools") else "h11") if http == "auto" else http
    return {"http": parser, "loop": "uvloop" if installed("uvloop") else "asyncio",
            "decode_frames_in": decode_frames_in,
            "switch_interval_ms": round(sys.getswitchinterval() * 1000, 3)}


@dataclass
class ServerConfig:
    # where the model comes from
    checkpoint: str | None = None  # a Dispider checkpoint (or its split); None: the tiny random test checkpoint
    split_dir: str | None = None  # where the split goes; default: a cache dir per checkpoint
    served_model_name: str = DEFAULT_MODEL_NAME
    # network
    host: str = "127.0.0.1"
    port: int = 8000
    # reaction engine (vLLM)
    dtype: str = "auto"  # float32 on the CPU, the checkpoint's dtype on a GPU
    max_model_len: int = 16384
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None  # the reaction's prefill chunk; None: 8192 on a GPU, else vLLM's
    gpu_memory_utilization: float | None = None  # None: by placement (0.75 of a GPU shared with the sidecar)
    tensor_parallel_size: int = 1
    enforce_eager: bool | None = None  # None: on for the CPU (no compilation), off on a GPU
    disable_custom_all_reduce: bool = False  # tensor parallelism: NCCL only, no CUDA-IPC all-reduce kernel
    cpu_kv_cache_gib: int = 1
    scheduling_policy: str = "fcfs"  # "priority": reactions are ordered by their tenant's priority
    reaction_mps_priority: str = "below_normal"  # under CUDA MPS: the reaction's kernels queue behind the sidecar's
    quantization: str | None = None  # "fp8": vLLM's online FP8 for the reaction model (GPU only)
    # each vLLM step first waits while the sidecar decides closed clips, at most this long (0: never waits);
    # None: 25 ms on a GPU the sidecar shares with the reaction, else 0 (serve.app.decision_gate_ms)
    decision_gate_ms: float | None = None
    # sidecar (perception + decision)
    sidecar_device: str = "auto"
    sidecar_threads: int | None = None
    preprocess_on: str = "auto"  # where frames are resized and normalised: auto (device on a GPU), device, host
    preprocess_workers: int = 4  # host: threads preprocessing frames as they arrive in the sidecar (0: on its loop)
    # CLIP tower (and the compact model's prefill) per frame as it arrives, or per clip: auto, arrival, prefill, clip
    frame_perception: str = "auto"
    sidecar_kv_slots: int = 16  # streams whose decision KV caches the sidecar allocates up front
    cuda_graphs: bool = True  # the sidecar's small steps from CUDA graphs (GPU only)
    sidecar_lanes: bool = False  # the frames' passes no clip waits on, on a low-priority CUDA stream (GPU only)
    # closes-first: a closed clip's step passes only its own frames, the others' go in steps of their own; together:
    # every step passes all waiting frames (dispider_vllm.sidecar.engine.ArrivalPolicy)
    sidecar_schedule: str = "closes-first"
    sidecar_turn_log: str | None = None  # a JSON line per sidecar turn here (latency analysis)
    sidecar_quantization: str | None = None  # "fp8": the sidecar's matmuls in FP8 (dispider_vllm/fp8.py)
    frame_ring_mb: int = 256  # shared memory carrying frames' pixels to the sidecar (0: pickled through the pipe)
    max_batch_clips: int = 32
    max_kept_clips: int = 32  # per stream: the last clips kept for retrieval and global memory
    kept_clips_memory_gib: float | None = None  # all streams' kept clips together; None: 40% of the host's memory
    respond_every: int | None = None
    respond_probability: float | None = None  # or answer each clip with this probability
    # requests and sessions
    default_max_tokens: int = 256
    max_upload_mb: int = 256
    allowed_local_media_path: str | None = None
    media_fetch_timeout_s: float = 30.0
    max_sessions: int = 64
    session_idle_timeout_s: float = 600.0
    # An idle HTTP connection stays open this long: a camera pushing a frame a second keeps one connection, and a
    # client's pool (httpx: 5 s) never reuses one the server is closing at that moment. uvicorn's own default is 5.
    keep_alive_s: int = 30
    http: str = "auto"  # uvicorn's HTTP/1.1 parser: auto (httptools when installed, else h11), httptools, h11
    access_log: str = "except-frames"  # uvicorn's line per request: all, except-frames (accepted pushes), off
    switch_interval_ms: float | None = None  # sys.setswitchinterval for the server's process; None: Python's 5 ms
    decode_frames_in: str = "sidecar"  # where pushed images are decoded: "sidecar" (its process) or "server" (here)
    event_buffer: int = 4096
    blocking_reaction: bool = False  # benchmark baseline: sessions' input waits while they answer
    # tenants and capacity (serve.tenants, serve.quotas, serve.admission)
    tenants_file: str | None = None  # None: open mode, every request is the tenant "default"
    capacity_streams: int | None = None  # streams admitted at once (besides max_sessions)
    capacity_file: str | None = None  # or a cost file, calibrated by the benchmarks, or a measured sweep
    capacity_bound: str = "realtime"  # a sweep's capacity: "realtime" (largest real-time N) or "latency"
    log_level: str = "info"

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb << 20

    @property
    def kept_clips_budget_bytes(self) -> int:
        if self.kept_clips_memory_gib is None:
            return default_kept_clips_budget_bytes()
        return max(1, int(self.kept_clips_memory_gib * (1 << 30)))

    def tenant_directory(self):
        """The tenants and their keys (raises TenantsFileError); open without a tenants file."""
        from serve.tenants import TenantDirectory, load_tenants

        return load_tenants(self.tenants_file) if self.tenants_file else TenantDirectory()

    def stream_capacity(self) -> int:
        """Streams admitted at once (raises ValueError on a bad cost file)."""
        from serve.admission import capacity_streams

        return capacity_streams(self.max_sessions, self.capacity_streams, self.capacity_file, self.capacity_bound)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"


# Where a container's memory limit is written (cgroup v2, then v1); "max" or a huge number means none.
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory_bytes() -> int:
    """The memory this process may use: the host's physical memory, or a container's lower limit."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in CGROUP_MEMORY_LIMITS:
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            return min(physical, int(limit))
    return physical


def default_kept_clips_budget_bytes() -> int:
    return int(KEPT_CLIPS_HOST_MEMORY_SHARE * host_memory_bytes())


@dataclass(frozen=True)
class ModelParts:
    """The two directories the server runs: the vLLM reaction model and the sidecar's part."""

    source: Path
    reaction_dir: Path
    perception_decision_dir: Path


def resolve_model_parts(config: ServerConfig) -> ModelParts:
    """Find or make the split of the configured checkpoint (the random test checkpoint when none is given)."""
    if config.checkpoint is None:
        return _default_checkpoint_parts()
    source = Path(config.checkpoint).expanduser().resolve()
    if not source.is_dir():
        raise SystemExit(f"--checkpoint {source} is not a directory")
    if _is_split(source):
        log.info("checkpoint %s is already split", source)
        return ModelParts(source, source / "reaction", source / "perception_decision")
    return _split(source, Path(config.split_dir).expanduser() if config.split_dir else None)


def _is_split(directory: Path) -> bool:
    from dispider_vllm.checkpoint.split import SPLIT_MARKER_NAME

    return (directory / SPLIT_MARKER_NAME).is_file()


def _split(source: Path, split_dir: Path | None) -> ModelParts:
    from dispider_vllm.checkpoint.cache import default_split_dir
    from dispider_vllm.checkpoint.split import split_checkpoint

    out_dir = split_dir or default_split_dir(source)
    log.info("splitting checkpoint %s into %s (a no-op when already done)", source, out_dir)
    split = split_checkpoint(source, out_dir, progress=lambda line: log.info("split: %s", line))
    return ModelParts(source, Path(split.reaction_dir), Path(split.perception_decision_dir))


def _default_checkpoint_parts() -> ModelParts:
    from dispider_vllm.checkpoint.random import ensure_default_checkpoint

    log.info("no --checkpoint: using the tiny random test checkpoint (made on first use)")
    made = ensure_default_checkpoint()
    return ModelParts(Path(made.checkpoint_dir), Path(made.reaction_dir), Path(made.perception_decision_dir))
