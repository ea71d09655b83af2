"""Plain vLLM serving the reaction LLM alone, under the request load of N live streams: the upper bound of the
reaction path.

    # H200, Qwen2-7B shapes (dummy weights, bf16), the N of the live-stream sweep, same timing as that sweep
    python benchmarks/plain_vllm_bench.py --streams 64 128 256 --duration 160 \\
        --out benchmarks/results/plain_vllm_h200.json
    # CPU smoke run (tiny Qwen2, not a figure)
    python benchmarks/plain_vllm_bench.py --tiny --streams 2 --duration 10 --respond-every 1 --prompt-tokens 200 \\
        --out /tmp/plain.json

vLLM's own ``Qwen2ForCausalLM`` (the decoder inside ``DispiderReactionForCausalLM``, without projectors or clip
bundles) runs in ``AsyncLLM``, configured as ``dispider-serve`` configures its reaction engine (prefix caching and
chunked prefill on, greedy sampling) and driven in-process: no HTTP, no sidecar, no bundle transfer. Whatever the
Dispider server's reaction path measures can be at best this.

The load. Each of N streams triggers one answer every ``--respond-every`` clips of 16 s, so requests arrive at N /
(16 x respond_every) per second on average. ``--arrivals poisson`` (the default) makes every stream an independent
Poisson process of that rate, as the live sweep's server does when it answers each clip with probability 1 /
respond_every (``--respond-probability``, ``benchmarks/h200_streams.sh``). ``--arrivals staggered`` times them the
way ``--respond-every`` does on the server: stream i's triggers come at i x stagger / N + j x 16 x respond_every
seconds (j = 0, 1, ...), with ``--stagger`` 16 s (one clip, as the sweep spreads its stream starts), so the N
streams' answers come in a burst of N within 16 s once every period; ``--stagger`` equal to the period spreads them
evenly. (The run starts at the streams' first trigger, j = 0, instead of idling through their first period.)
``--arrivals burst`` sends one request per stream, all at once: the engine batches as well as it can, and
``completed_per_s`` (answers finished / seconds to the last one) is the reaction's throughput ceiling on this GPU,
which bounds how many streams any design that runs this reaction can serve (``benchmarks/capacity_bound.py``). Every
request is ``--prompt-tokens`` random ordinary token ids (default 4,464: a Dispider reaction prompt of k = 4
retrieved clips, 1088 x 4 positions, t = 48 global-memory tokens and 64 of question text) drawn from its own seed,
so no two prompts share a cache block and the prefix cache cannot help (``prefix_cached_tokens`` in the report
checks it), and asks for ``--max-tokens`` tokens with ``ignore_eos``. Requests are independent (a stream's next one
does not wait for its last).

Recorded per N, with p50/p90/p99: time to first token (the trigger's scheduled instant -> first token out of
``generate``), inter-token latency (per request: first to last token / (tokens - 1), as load_streams.py),
end-to-end latency (trigger -> last token), tokens/s per request and in total, requests issued / completed, how
late the client submitted (``submit_lag_s``: should stay near 0, else the client is the limit), and GPU memory
(nvidia-smi, whole device) when there is a GPU. One engine serves every N, one after the other, after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# Sibling benchmark modules: their shapes, model dirs, statistics and GPU probes are the ones the other reports use.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_streams import CLIP_SECONDS, MAX_P99_TTFT_S, distribution, nvidia_smi_memory  # noqa: E402
from reaction_bench import QWEN2_7B, TINY, device_name, write_model_dirs  # noqa: E402

REPORT_VERSION = 1
TAG = "[plain-vllm]"
PROGRESS_EVERY_S = 10.0
SAMPLE_GPU_EVERY_S = 5.0
WARMUP_REQUESTS = 2
DEFAULT_PROMPT_TOKENS = 1088 * 4 + 48 + 64  # 4,464: k = 4 clips, t = 48 global-memory tokens, 64 of question


def say(message: str) -> None:
    print(f"{TAG} {message}", flush=True)


# ---- the load ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedRequest:
    at_s: float  # seconds after the run's start
    stream: int
    index: int  # unique within the run: seeds its prompt


def period_s(respond_every: int) -> float:
    return CLIP_SECONDS * respond_every


def staggered_arrivals(streams: int, period: float, stagger: float, duration: float) -> list[tuple[float, int]]:
    """Stream i triggers at i * stagger / N + j * period, as live streams started over ``stagger`` seconds do."""
    times = []
    for stream in range(streams):
        at = stagger * stream / streams
        while at < duration:
            times.append((at, stream))
            at += period
    return times


def poisson_arrivals(streams: int, period: float, duration: float, rng: random.Random) -> list[tuple[float, int]]:
    """Each stream an independent Poisson process of rate 1 / period (together: rate N / period)."""
    times = []
    for stream in range(streams):
        at = rng.expovariate(1 / period)
        while at < duration:
            times.append((at, stream))
            at += rng.expovariate(1 / period)
    return times


def plan_requests(streams: int, args: argparse.Namespace) -> list[PlannedRequest]:
    period = period_s(args.respond_every)
    if args.arrivals == "burst":
        times = [(0.0, stream) for stream in range(streams)]
    elif args.arrivals == "poisson":
        times = poisson_arrivals(streams, period, args.duration, random.Random(args.seed * 1_000_003 + streams))
    else:
        times = staggered_arrivals(streams, period, args.stagger, args.duration)
    times.sort()
    return [PlannedRequest(at, stream, i) for i, (at, stream) in enumerate(times)]


class PromptMaker:
    """Random ordinary token ids, seeded per request: no two prompts share a prefix-cache block."""

    def __init__(self, ordinary_ids: list[int], length: int, seed: int) -> None:
        self.ordinary_ids = ordinary_ids
        self.length = length
        self.seed = seed

    def make(self, run: int, index: int) -> dict:
        rng = random.Random(f"{self.seed}/{run}/{index}")
        return {"prompt_token_ids": rng.choices(self.ordinary_ids, k=self.length)}


def ordinary_token_ids(model_dir: Path) -> list[int]:
    """Ids the tokenizer spells that are not special: a random special token could end or reshape a prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    special = set(tokenizer.all_special_ids)
    return [i for i in range(min(len(tokenizer), vocab)) if i not in special]


# ---- the engine ---------------------------------------------------------------------------------------------------------
def build_engine(model_dir: Path, args: argparse.Namespace):
    """AsyncLLM as dispider-serve builds its reaction engine (serve/ -> dispider_vllm/reaction/engine.py)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    if args.tiny:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU build otherwise takes a large share
    engine_args = AsyncEngineArgs(
        model=str(model_dir),
        load_format="dummy",  # random weights: nothing to download, the speed of the real shapes
        dtype="float32" if args.tiny else "bfloat16",
        quantization=args.quantization,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager or args.tiny,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        seed=args.seed,
        disable_log_stats=True,
    )
    return AsyncLLM.from_engine_args(engine_args)


def engine_summary(llm) -> dict:
    """The settings vLLM resolved (batch limits, KV blocks): they bound what any N can get."""
    config = llm.vllm_config
    return {
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "kv_cache_blocks": config.cache_config.num_gpu_blocks,
        "block_size": config.cache_config.block_size,
        "enforce_eager": config.model_config.enforce_eager,
        "dtype": str(config.model_config.dtype).replace("torch.", ""),
    }


def sampling_params(max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    # Greedy, as dispider-serve answers by default; DELTA outputs so each token's arrival is seen once.
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA)


# ---- one request -----------------------------------------------------------------------------------------------------------
@dataclass
class RequestRecord:
    stream: int
    scheduled: float  # monotonic instant of the trigger
    submitted: float | None = None
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    cached_tokens: int = 0
    finished: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.scheduled

    @property
    def e2e(self) -> float | None:
        return self.last - self.scheduled if self.finished and self.last is not None else None

    @property
    def decode_span(self) -> float | None:
        """First to last token, when there were two tokens or more apart in time."""
        if self.tokens < 2 or self.first is None or self.last is None or self.last <= self.first:
            return None
        return self.last - self.first


async def issue_request(llm, planned: PlannedRequest, prompts: PromptMaker, run_id: int, params,
                        record: RequestRecord) -> None:
    await asyncio.sleep(max(0.0, record.scheduled - time.monotonic()))
    prompt = prompts.make(run_id, planned.index)
    record.submitted = time.monotonic()
    try:
        async for output in llm.generate(prompt, params, f"plain-r{run_id}-{planned.index}"):
            now = time.monotonic()
            new_tokens = len(output.outputs[0].token_ids)
            if new_tokens:
                record.first = record.first or now
                record.last = now
                record.tokens += new_tokens
            record.cached_tokens = output.num_cached_tokens or record.cached_tokens
            record.finished = output.finished
    except Exception as error:  # noqa: BLE001 - one failed request is a figure, not the end of the run
        record.error = f"{type(error).__name__}: {error}"


# ---- one run of N streams ---------------------------------------------------------------------------------------------------
@dataclass
class GpuSamples:
    used_mib: list[list[float]] = field(default_factory=list)  # per sample, per GPU
    total_mib: list[float] | None = None


async def sample_gpu_memory(samples: GpuSamples) -> None:
    """Whole-device memory from nvidia-smi: the engine core's process holds the memory, not this one."""
    if shutil.which("nvidia-smi") is None:
        return
    while True:
        reading = await asyncio.to_thread(nvidia_smi_memory)
        if reading is not None:
            samples.used_mib.append(reading[0])
            samples.total_mib = reading[1]
        await asyncio.sleep(SAMPLE_GPU_EVERY_S)


async def report_progress(streams: int, planned: list[PlannedRequest], records: list[RequestRecord],
                          run_start: float) -> None:
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        issued = sum(r.submitted is not None for r in records)
        done = sum(r.finished for r in records)
        ttft = distribution([r.ttft for r in records if r.ttft is not None])
        say(f"N={streams}: t={time.monotonic() - run_start:.0f}s issued {issued}/{len(planned)}, done {done}, "
            f"in flight {issued - done}, TTFT p50/p99 {fmt_s(ttft['p50'])}/{fmt_s(ttft['p99'])}")


async def run_streams(llm, run_id: int, streams: int, prompts: PromptMaker, args: argparse.Namespace) -> dict:
    planned = plan_requests(streams, args)
    params = sampling_params(args.max_tokens)
    say(f"N={streams}: {len(planned)} requests over {trigger_seconds(args):g} s "
        f"(mean {streams / period_s(args.respond_every):.3f}/s, {args.arrivals})")
    run_start = time.monotonic() + 0.5  # room to create every task before the first trigger is due
    records = [RequestRecord(p.stream, run_start + p.at_s) for p in planned]
    gpu = GpuSamples()
    helpers = [asyncio.create_task(sample_gpu_memory(gpu)),
               asyncio.create_task(report_progress(streams, planned, records, run_start))]
    tasks = [asyncio.create_task(issue_request(llm, p, prompts, run_id, params, r))
             for p, r in zip(planned, records)]
    try:
        unfinished = await wait_with_drain(tasks, run_start + trigger_seconds(args) + args.drain_timeout)
    finally:
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    wall = max([r.last for r in records if r.last is not None] + [run_start + trigger_seconds(args)]) - run_start
    return summarize_run(streams, records, unfinished, wall, gpu, args)


def trigger_seconds(args: argparse.Namespace) -> float:
    """How long triggers keep coming: a burst comes at once."""
    return 0.0 if args.arrivals == "burst" else args.duration


async def wait_with_drain(tasks: list[asyncio.Task], deadline: float) -> int:
    """Wait for every request until ``deadline``; cancel (abort in vLLM) what is left, return how many."""
    if not tasks:
        return 0
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)


def summarize_run(streams: int, records: list[RequestRecord], unfinished: int, wall: float, gpu: GpuSamples,
                  args: argparse.Namespace) -> dict:
    completed = [r for r in records if r.finished]
    tokens = sum(r.tokens for r in records)
    spans = [(r.tokens, r.decode_span) for r in completed if r.decode_span is not None]
    ttft = distribution([r.ttft for r in records if r.ttft is not None])
    return {
        "streams": streams,
        "arrival_rate_per_s": round(streams / period_s(args.respond_every), 4),
        "wall_s": round(wall, 4),
        "requests": {
            "issued": sum(r.submitted is not None for r in records),
            "planned": len(records),
            "completed": len(completed),
            "failed": sum(r.error is not None for r in records),
            "unfinished": unfinished,
            "errors": sorted({r.error for r in records if r.error})[:5],
        },
        "ttft_s": ttft,
        "itl_s": distribution([span / (n - 1) for n, span in spans]),
        "e2e_s": distribution([r.e2e for r in completed if r.e2e is not None]),
        "tokens_per_s_per_request": distribution([(n - 1) / span for n, span in spans]),
        "submit_lag_s": distribution([r.submitted - r.scheduled for r in records if r.submitted is not None]),
        "tokens_total": tokens,
        "tokens_per_s_total": round(tokens / wall, 4) if wall > 0 else None,
        "completed_per_s": round(len(completed) / wall, 4) if wall > 0 else None,
        "prefix_cached_tokens": sum(r.cached_tokens for r in records),
        "gpu_memory": gpu_memory_summary(gpu),
        "within_ttft_bound": None if ttft["p99"] is None else ttft["p99"] <= MAX_P99_TTFT_S,
    }


def gpu_memory_summary(gpu: GpuSamples) -> dict | None:
    if not gpu.used_mib:
        return None
    return {"source": "nvidia-smi", "max_used_mib": [max(g) for g in zip(*gpu.used_mib)], "total_mib": gpu.total_mib}


async def warm_up(llm, prompts: PromptMaker, max_tokens: int) -> None:
    """A few requests first: the first prefills of this length and first decode steps are not what we measure."""
    params = sampling_params(max_tokens)

    async def one(index: int) -> None:
        async for _ in llm.generate(prompts.make(-1, index), params, f"plain-warmup-{index}"):
            pass

    await asyncio.gather(*(one(i) for i in range(WARMUP_REQUESTS)))


# ---- driver -------------------------------------------------------------------------------------------------------------------
async def run_all(model_dir: Path, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    say(f"starting vLLM AsyncLLM on {model_dir} ({'tiny, CPU' if args.tiny else 'Qwen2-7B shapes'}) ...")
    started = time.monotonic()
    llm = build_engine(model_dir, args)
    try:
        engine = engine_summary(llm)
        say(f"engine up in {time.monotonic() - started:.0f} s: {engine}")
        prompts = PromptMaker(ordinary_token_ids(model_dir), args.prompt_tokens, args.seed)
        await warm_up(llm, prompts, args.max_tokens)
        runs = []
        for run_id, streams in enumerate(args.streams):
            run = await run_streams(llm, run_id, streams, prompts, args)
            print_run(run)
            runs.append(run)
        return engine, runs
    finally:
        llm.shutdown()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/plain_vllm_bench.py",
        description="Plain vLLM (Qwen2ForCausalLM, Qwen2-7B shapes, dummy weights) under the answer load of N live "
                    "streams: TTFT, inter-token and end-to-end latency, tokens/s, GPU memory. The upper bound of the "
                    "Dispider reaction path.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    parser.add_argument("--streams", type=int, nargs="+", default=[64, 128, 256], metavar="N",
                        help="stream counts to run, one after the other (default 64 128 256)")
    parser.add_argument("--duration", type=float, default=160.0, metavar="S",
                        help="seconds of triggers per N (default 160); the run then waits for the answers")
    parser.add_argument("--respond-every", type=int, default=8, metavar="K",
                        help="a stream answers every K clips of 16 s (default 8, as benchmarks/h200_streams.sh)")
    parser.add_argument("--arrivals", choices=["staggered", "poisson", "burst"], default="poisson",
                        help="poisson (default): each stream a Poisson process of rate 1/(16*K), as the live sweep's "
                             "server answers each clip with probability 1/K; staggered: stream i at "
                             "i*stagger/N + j*16*K s (the sweep's --respond-every timing); burst: one request per "
                             "stream, all at once (the throughput ceiling, completed_per_s; --duration unused)")
    parser.add_argument("--stagger", type=float, default=float(CLIP_SECONDS), metavar="S",
                        help=f"staggered: stream phases spread over S s (default {CLIP_SECONDS}, one clip, as "
                             "load_streams.py; 16*K spreads the triggers evenly)")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS, metavar="T",
                        help=f"prompt length in tokens (default {DEFAULT_PROMPT_TOKENS}: 1088*4 clip positions + 48 "
                             "global-memory + 64 text)")
    parser.add_argument("--max-tokens", type=int, default=32, metavar="T", help="tokens per answer (default 32)")
    parser.add_argument("--drain-timeout", type=float, default=120.0, metavar="S",
                        help="after the last trigger, wait at most S s for the answers (default 120)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, metavar="F", help="default 0.85")
    parser.add_argument("--max-model-len", type=int, default=8192, metavar="T", help="default 8192")
    parser.add_argument("--quantization", choices=["fp8"],
                        help="fp8: vLLM's online FP8 of the bf16 weights, as dispider-serve --quantization fp8 "
                             "(a GPU of compute capability 8.9+)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (always on with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny Qwen2 (hidden 256, 2 layers, head_dim 64) on the CPU: a smoke run, not a figure")
    parser.add_argument("--seed", type=int, default=0, help="seeds prompts, Poisson arrivals and vLLM (default 0)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/plain_vllm_h200.json"),
                        help="JSON report (default benchmarks/results/plain_vllm_h200.json)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if min(args.streams) < 1 or args.respond_every < 1 or args.prompt_tokens < 1 or args.max_tokens < 1:
        parser.error("--streams, --respond-every, --prompt-tokens and --max-tokens must be positive")
    if args.duration <= 0 or args.stagger < 0 or args.drain_timeout < 0:
        parser.error("--duration must be positive, --stagger and --drain-timeout not negative")
    if args.prompt_tokens + args.max_tokens > args.max_model_len:
        parser.error(f"--prompt-tokens + --max-tokens ({args.prompt_tokens + args.max_tokens}) exceeds "
                     f"--max-model-len {args.max_model_len}")
    if args.quantization and args.tiny:
        parser.error(f"--quantization {args.quantization} needs a GPU; --tiny runs on the CPU")


def build_report(args: argparse.Namespace, engine: dict, runs: list[dict], started: float) -> dict:
    import vllm

    return {
        "benchmark": "plain_vllm",
        "version": REPORT_VERSION,
        "device": device_name(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "command": "python benchmarks/plain_vllm_bench.py " + " ".join(sys.argv[1:]),
        "vllm": vllm.__version__,
        "shapes": "tiny Qwen2 (float32)" if args.tiny else f"Qwen2-7B (dummy weights, {args.quantization or 'bf16'})",
        "model_config": TINY if args.tiny else QWEN2_7B,
        "config": {
            "stream_counts": args.streams, "duration_s": args.duration, "respond_every": args.respond_every,
            "clip_s": CLIP_SECONDS, "arrivals": args.arrivals,
            "stagger_s": args.stagger if args.arrivals == "staggered" else None,
            "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "ignore_eos": True,
            "temperature": 0.0, "drain_timeout_s": args.drain_timeout,
            "gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": args.max_model_len,
            "enforce_eager": args.enforce_eager or args.tiny, "prefix_caching": True, "chunked_prefill": True,
            "quantization": args.quantization,
            "seed": args.seed, "max_p99_ttft_s": MAX_P99_TTFT_S,
        },
        "engine": engine,
        "runs": runs,
    }


def print_run(run: dict) -> None:
    q = run["requests"]
    say(f"N={run['streams']}: {q['completed']}/{q['planned']} completed ({q['failed']} failed, {q['unfinished']} "
        f"unfinished), TTFT p50/p99 {fmt_s(run['ttft_s']['p50'])}/{fmt_s(run['ttft_s']['p99'])}, "
        f"ITL p50 {fmt_s(run['itl_s']['p50'])}, {run['tokens_per_s_total']} tok/s, "
        f"{run['completed_per_s']} answers/s")


def print_table(report: dict) -> None:
    print(f"\nPlain vLLM on {report['device']} ({report['shapes']}), prompt {report['config']['prompt_tokens']} "
          f"tokens, {report['config']['max_tokens']} out, {report['config']['arrivals']} arrivals")
    print(f"{'N':>5} {'req/s':>7} {'done':>9} {'TTFT p50':>9} {'p90':>8} {'p99':>8} {'ITL p50':>8} {'p99':>8} "
          f"{'E2E p50':>8} {'p99':>8} {'tok/s':>8} {'GPU MiB':>8}")
    for run in report["runs"]:
        t, i, e, q = run["ttft_s"], run["itl_s"], run["e2e_s"], run["requests"]
        memory = run["gpu_memory"]["max_used_mib"][0] if run["gpu_memory"] else None
        print(f"{run['streams']:>5} {run['arrival_rate_per_s']:>7.3f} {q['completed']:>4}/{q['planned']:<4} "
              f"{fmt_s(t['p50']):>9} {fmt_s(t['p90']):>8} {fmt_s(t['p99']):>8} {fmt_s(i['p50']):>8} "
              f"{fmt_s(i['p99']):>8} {fmt_s(e['p50']):>8} {fmt_s(e['p99']):>8} "
              f"{run['tokens_per_s_total'] or 0:>8.1f} {'-' if memory is None else f'{memory:.0f}':>8}")


def fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None or not math.isfinite(seconds) else f"{seconds:.3f}s"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_dirs(Path(tmp), args.tiny)["plain"]
        engine, runs = asyncio.run(run_all(model_dir, args))
    report = build_report(args, engine, runs, started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    say(f"wrote {args.out}")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
