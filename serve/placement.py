"""Where the two model parts run: the reaction LLM's GPUs (vLLM tensor parallelism) and the sidecar's device.

The reaction engine takes the first ``--tensor-parallel-size`` visible GPUs (vLLM's own order). The sidecar goes,
by default, on the first GPU the reaction does not use, so that on a two-GPU host perception and decision get a
GPU of their own; when every GPU serves the reaction it shares GPU 0 with it. vLLM's share of GPU memory follows:
what it may take of a GPU that the sidecar shares, more of GPUs that are its alone. On a GPU host the sidecar
needs only a few CPU threads (it preprocesses frames); more would spin against the server's and vLLM's processes
for the host's cores.

Everything here is decided before any process starts, so a placement the host cannot give fails at once, with a
message, instead of deep inside vLLM's start-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SHARED_GPU_MEMORY_UTILIZATION = 0.75  # vLLM's share of a GPU that the sidecar also uses
OWN_GPU_MEMORY_UTILIZATION = 0.90  # of GPUs that serve the reaction alone
SIDECAR_THREADS_ON_GPU = 4


class PlacementError(ValueError):
    """A placement this host cannot give (the message says which option and why)."""


@dataclass(frozen=True)
class Placement:
    platform: str  # "cuda" or "cpu"
    reaction_devices: tuple[str, ...]  # one per tensor-parallel rank
    sidecar_device: str
    sidecar_shares_gpu: bool
    gpu_memory_utilization: float  # vLLM's share of each of its GPUs
    sidecar_threads: int | None  # None: torch's default (all cores)

    @property
    def tensor_parallel_size(self) -> int:
        return len(self.reaction_devices)

    def describe(self) -> dict:
        return {**asdict(self), "tensor_parallel_size": self.tensor_parallel_size}


def plan_placement(*, platform: str, gpu_count: int, cpu_count: int, tensor_parallel_size: int = 1,
                   sidecar_device: str = "auto", gpu_memory_utilization: float | None = None,
                   sidecar_threads: int | None = None) -> Placement:
    """The placement for these options on a host with ``gpu_count`` visible GPUs (``platform`` is vLLM's)."""
    if tensor_parallel_size < 1:
        raise PlacementError(f"--tensor-parallel-size must be at least 1, not {tensor_parallel_size}")
    if platform == "cpu":
        return _cpu_placement(tensor_parallel_size, sidecar_device, gpu_memory_utilization, sidecar_threads)
    if tensor_parallel_size > gpu_count:
        raise PlacementError(f"--tensor-parallel-size {tensor_parallel_size} needs {tensor_parallel_size} GPUs; "
                             f"{gpu_count} visible (CUDA_VISIBLE_DEVICES)")
    reaction = tuple(f"cuda:{index}" for index in range(tensor_parallel_size))
    sidecar = _sidecar_gpu(sidecar_device, gpu_count, tensor_parallel_size)
    shares = sidecar in reaction
    if gpu_memory_utilization is None:
        gpu_memory_utilization = SHARED_GPU_MEMORY_UTILIZATION if shares else OWN_GPU_MEMORY_UTILIZATION
    if not 0 < gpu_memory_utilization <= 1:
        raise PlacementError(f"--gpu-memory-utilization must be in (0, 1], not {gpu_memory_utilization}")
    if sidecar_threads is None and sidecar != "cpu":
        sidecar_threads = min(SIDECAR_THREADS_ON_GPU, cpu_count)
    return Placement("cuda", reaction, sidecar, shares, gpu_memory_utilization, sidecar_threads)


def _cpu_placement(tensor_parallel_size: int, sidecar_device: str, gpu_memory_utilization: float | None,
                   sidecar_threads: int | None) -> Placement:
    if sidecar_device not in ("auto", "cpu"):
        raise PlacementError(f"--sidecar-device {sidecar_device}: vLLM runs on the CPU here (no GPU), so the "
                             "sidecar does too; use --sidecar-device cpu or auto")
    # vLLM's CPU worker reads this as its share of host memory (the KV cache size is set apart: --cpu-kv-cache-gib).
    share = SHARED_GPU_MEMORY_UTILIZATION if gpu_memory_utilization is None else gpu_memory_utilization
    return Placement("cpu", ("cpu",) * tensor_parallel_size, "cpu", False, share, sidecar_threads)


def _sidecar_gpu(requested: str, gpu_count: int, tensor_parallel_size: int) -> str:
    """``auto``: the first GPU the reaction does not use, else GPU 0; ``cuda`` means GPU 0."""
    if requested == "auto":
        return f"cuda:{tensor_parallel_size}" if gpu_count > tensor_parallel_size else "cuda:0"
    if requested == "cpu":
        return "cpu"
    kind, _, index = requested.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise PlacementError(f"--sidecar-device {requested!r}: use auto, cpu, cuda or cuda:N")
    index = int(index or 0)
    if index >= gpu_count:
        raise PlacementError(f"--sidecar-device {requested}: there are {gpu_count} visible GPUs (cuda:0 to "
                             f"cuda:{gpu_count - 1})")
    return f"cuda:{index}"


def host_placement(config) -> Placement:
    """The placement of a ``ServerConfig`` on this host, as vLLM sees it."""
    import os

    from vllm.platforms import current_platform

    platform = "cpu" if current_platform.is_cpu() else "cuda"
    gpu_count = 0 if platform == "cpu" else current_platform.device_count()  # NVML: no CUDA context here
    return plan_placement(
        platform=platform, gpu_count=gpu_count, cpu_count=os.cpu_count() or 1,
        tensor_parallel_size=config.tensor_parallel_size, sidecar_device=config.sidecar_device,
        gpu_memory_utilization=config.gpu_memory_utilization, sidecar_threads=config.sidecar_threads,
    )
