"""Reference-style stream capacity with its blocking reaction: perception -> decision -> reaction, one stream.

    python benchmarks/reference_bench.py --ours benchmarks/results/streams_h200.json \\
        --out benchmarks/results/reference_h200.json                                  # GPU, real shapes
    python benchmarks/reference_bench.py --tiny --out /tmp/reference_cpu.json          # CPU smoke run

The way the authors' code runs Dispider: Hugging Face transformers modules, one stream at a time, and while the
model answers it does not watch (the reaction blocks the stream). Random weights, nothing downloaded; bf16 on
the GPU, fp32 on the CPU.

- perception + decision: ``run_reference`` of ``benchmarks/sidecar_bench.py`` (CLIP ViT-L/14-224 + Qwen2-1.5B,
  uncached, with the summary and global-memory work at each trigger), ``--history`` unmeasured clips, then the
  mean over ``--rounds`` measured clips. Keep ``--rounds`` a multiple of ``--respond-every`` so the measured
  clips hold whole trigger cycles.
- reaction: a transformers ``Qwen2ForCausalLM`` of Qwen2-7B shapes, ``generate(inputs_embeds=[1, P, H])``
  greedy with exactly ``--answer-tokens`` new tokens (min = max, so an early EOS cannot shorten it). P is the
  reaction prompt of the live benchmarks: a k = 4 bundle (1088 positions a clip), t = 48 global-memory
  positions and 64 of text = 4,464. One warm-up, then the median of ``--reactions`` runs, new inputs each time.
  The projectors that turn the bundle into embeddings are left out (small next to the 7B; leaving them out
  favours the reference).
- capacity: one trigger every ``--respond-every`` clips, so a clip costs perception + decision plus
  reaction / respond_every seconds; a 1-fps stream closes a 16-frame clip every 16 s, so the real-time streams
  are 16 / that cost.

``--ours FILE`` (a ``load_streams.py`` sweep JSON) or ``--ours-streams N`` adds the capacity ratio of the whole
dispider-vllm server against the reference with its reaction (target 10x). ``--from-report FILE`` measures
nothing: it adds that ratio to a report written earlier (the live sweep ran after it, on the same machine):

    python benchmarks/reference_bench.py --from-report reference.json --ours streams.json --out reference.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reaction_bench import QWEN2_7B, TINY, TTFT_POSITIONS  # noqa: E402
from sidecar_bench import CLIP_SECONDS, device_name, run_reference, sync  # noqa: E402

from dispider_vllm.perception.modules import PerceptionDecisionModules  # noqa: E402

QWEN2_EOS_ID = 151643  # Qwen2's <|endoftext|>; any id works for timing, it only has to be set for min_new_tokens
INIT_STD = 0.02
TARGET_RATIO = 10
LOG = "[reference-bench]"


def log(message: str) -> None:
    print(f"{LOG} {message}", flush=True)


# ----------------------------------------------------------------------------------------------- reaction model
def reaction_config(tiny: bool):
    """A Qwen2Config of the reaction LLM's shapes (reaction_bench's Qwen2-7B, or its tiny twin)."""
    from transformers import Qwen2Config

    shapes = {k: v for k, v in (TINY if tiny else QWEN2_7B).items() if k not in ("torch_dtype", "model_type")}
    eos = min(QWEN2_EOS_ID, shapes["vocab_size"] - 1)
    return Qwen2Config(**shapes, initializer_range=INIT_STD, eos_token_id=eos, pad_token_id=eos)


def build_reaction_model(config, device: torch.device, dtype: torch.dtype):
    """Qwen2ForCausalLM from a config, allocated on ``device`` in ``dtype`` with cheap random weights.

    transformers' own init is skipped (minutes for a 7B on the CPU); one normal_ per matrix is seconds on a GPU.
    """
    from transformers import Qwen2ForCausalLM
    from transformers.initialization import no_init_weights

    with torch.device(device), no_init_weights():
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(std=INIT_STD)
            elif name.endswith("bias"):
                param.zero_()
            else:  # RMSNorm scales
                param.fill_(1.0)
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def generate_answer(model, embeds: torch.Tensor, answer_tokens: int) -> torch.Tensor:
    """Greedy answer of exactly ``answer_tokens`` tokens for one prompt of embeddings [1, P, H]; new ids [1, A]."""
    config = model.config
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    # With inputs_embeds only, generate returns just the new tokens.
    return model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=answer_tokens,
                          min_new_tokens=answer_tokens, do_sample=False, eos_token_id=config.eos_token_id,
                          pad_token_id=config.pad_token_id)


def timed_reaction(model, args, device: torch.device, dtype: torch.dtype) -> tuple[float, int]:
    """One blocking reaction on new random inputs (so nothing is reused): (seconds, new tokens)."""
    embeds = torch.randn(1, args.prompt_positions, model.config.hidden_size, device=device, dtype=dtype) * INIT_STD
    sync(device)
    started = time.perf_counter()
    tokens = generate_answer(model, embeds, args.answer_tokens)
    sync(device)
    return time.perf_counter() - started, int(tokens.shape[1])


def measure_reaction(args, device: torch.device, dtype: torch.dtype) -> dict:
    config = reaction_config(args.tiny)
    started = time.perf_counter()
    model = build_reaction_model(config, device, dtype)
    sync(device)
    log(f"reaction model built in {time.perf_counter() - started:.1f} s")
    timed_reaction(model, args, device, dtype)  # warm-up: kernels, allocator
    runs, new_tokens = [], []
    for index in range(args.reactions):
        seconds, tokens = timed_reaction(model, args, device, dtype)
        runs.append(seconds)
        new_tokens.append(tokens)
        log(f"reaction {index + 1}/{args.reactions}: {tokens} tokens in {seconds:.3f} s")
    if set(new_tokens) != {args.answer_tokens}:  # a shorter answer would make the reaction look cheaper
        raise RuntimeError(f"generate gave {new_tokens} new tokens, not {args.answer_tokens} each")
    result = {
        "prompt_positions": args.prompt_positions,
        "new_tokens": new_tokens[0],
        "seconds_p50": statistics.median(runs),
        "seconds_all": runs,
        "attn_implementation": model.config._attn_implementation,
    }
    if device.type == "cuda":
        result["gpu_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    free_memory(device)
    return result


# ----------------------------------------------------------------------------------------------- perception + decision
def measure_perception_decision(args, device: torch.device, dtype: torch.dtype) -> dict:
    modules = PerceptionDecisionModules.random(real_shapes=not args.tiny, device=device, dtype=dtype)
    pixels = torch.randn(16, 3, 224, 224)
    result = run_reference(modules, pixels, args, device)
    del modules
    free_memory(device)
    return result


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------- capacity
def with_reaction(perception_decision: dict, reaction: dict, respond_every: int) -> dict:
    """Blocking: the stream stops while it answers, so each clip carries its share of one reaction."""
    seconds = perception_decision["seconds_per_clip"] + reaction["seconds_p50"] / respond_every
    return {"seconds_per_clip": seconds, "clips_per_s": 1 / seconds, "realtime_streams": CLIP_SECONDS / seconds}


def ours_streams(args) -> tuple[int | None, str | None]:
    """dispider-vllm's largest real-time N, from a load_streams sweep JSON or given directly."""
    if args.ours_streams is not None:
        return args.ours_streams, "--ours-streams"
    if args.ours is None:
        return None, None
    sweep = json.loads(args.ours.read_text()).get("sweep") or {}
    if sweep.get("max_realtime_streams") is None:
        raise SystemExit(f"{args.ours}: no sweep.max_realtime_streams (not a load_streams sweep, or none real-time)")
    return int(sweep["max_realtime_streams"]), str(args.ours)


def add_ratio(report: dict, args) -> None:
    ours, source = ours_streams(args)
    if ours is None:
        return
    ratio = ours / report["with_reaction"]["realtime_streams"]
    report["ours"] = {"max_realtime_streams": ours, "source": source}
    report["capacity_ratio"] = ratio
    report["capacity_ratio_perception_decision_only"] = ours / report["perception_decision"]["realtime_streams"]
    report["target_ratio"] = TARGET_RATIO
    report["meets_target"] = ratio >= TARGET_RATIO


# ----------------------------------------------------------------------------------------------- driver
def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reference_h200.json"),
                        help="the JSON report (default benchmarks/results/reference_h200.json)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke run, not a figure)")
    parser.add_argument("--history", type=int, default=8, help="unmeasured clips of history first (default 8)")
    parser.add_argument("--rounds", type=int, default=8,
                        help="measured clips (default 8: one whole trigger cycle at --respond-every 8)")
    parser.add_argument("--respond-every", type=int, default=8, help="one trigger every N clips (default 8)")
    parser.add_argument("--prompt-positions", type=int, default=TTFT_POSITIONS,
                        help=f"reaction prompt positions (default {TTFT_POSITIONS}: 1088*4 clip positions "
                             "+ 48 global memory + 64 text)")
    parser.add_argument("--answer-tokens", type=int, default=32,
                        help="tokens per answer (default 32, the live benchmark's max_tokens)")
    parser.add_argument("--reactions", type=int, default=5, help="measured reactions after a warm-up (default 5)")
    ours = parser.add_mutually_exclusive_group()
    ours.add_argument("--ours", type=Path, metavar="FILE",
                      help="a load_streams.py sweep JSON: its sweep.max_realtime_streams gives the capacity ratio")
    ours.add_argument("--ours-streams", type=int, metavar="N", help="dispider-vllm's real-time streams, given directly")
    parser.add_argument("--from-report", type=Path, metavar="FILE",
                        help="measure nothing: add the capacity ratio (--ours/--ours-streams) to this earlier report")
    args = parser.parse_args(argv)
    if args.from_report is not None and args.ours is None and args.ours_streams is None:
        parser.error("--from-report needs --ours or --ours-streams")
    for name in ("rounds", "respond_every", "prompt_positions", "answer_tokens", "reactions"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.rounds % args.respond_every:
        log(f"note: {args.rounds} measured clips are not whole trigger cycles of {args.respond_every}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_report is not None:
        return ratio_of_report(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    shapes = "tiny" if args.tiny else "CLIP ViT-L/14-224 + Qwen2-1.5B, reaction Qwen2-7B (random weights, bf16)"
    log(f"perception + decision: {shapes} on {device}, {args.history} clips of history, {args.rounds} measured")
    perception_decision = measure_perception_decision(args, device, dtype)
    log(f"perception + decision: {perception_decision['seconds_per_clip']:.3f} s a clip")
    log(f"reaction: {args.prompt_positions} positions, {args.answer_tokens} tokens, {args.reactions} runs")
    reaction = measure_reaction(args, device, dtype)
    report = {
        "benchmark": "reference",
        "device": device_name(device),
        "shapes": shapes,
        "command": "python benchmarks/reference_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {"history": args.history, "rounds": args.rounds, "respond_every": args.respond_every,
                   "prompt_positions": args.prompt_positions, "answer_tokens": args.answer_tokens,
                   "reactions": args.reactions},
        "perception_decision": perception_decision,
        "reaction": reaction,
        "with_reaction": with_reaction(perception_decision, reaction, args.respond_every),
    }
    return write_report(report, args)


def ratio_of_report(args) -> int:
    try:
        report = json.loads(args.from_report.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"--from-report {args.from_report}: {error}") from None
    if report.get("benchmark") != "reference":
        raise SystemExit(f"--from-report {args.from_report}: not a reference_bench.py report")
    return write_report(report, args)


def write_report(report: dict, args) -> int:
    """The capacity ratio (with --ours/--ours-streams) added, the report written to --out and printed."""
    add_ratio(report, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"written to {args.out}")
    print_table(report)
    return 0


def print_table(report: dict) -> None:
    pd, wr, reaction = report["perception_decision"], report["with_reaction"], report["reaction"]
    config = report["config"]
    print(f"\nReference-style (transformers, one stream at a time) on {report['device']} ({report['shapes']})")
    print(f"reaction: {reaction['seconds_p50']:.3f} s p50 ({config['prompt_positions']} positions, "
          f"{reaction['new_tokens']} tokens), one every {config['respond_every']} clips")
    print(f"{'computation':34} {'s/clip':>8} {'clips/s':>8} {'1-fps streams':>14}")
    print(f"{'perception + decision':34} {pd['seconds_per_clip']:8.3f} {pd['clips_per_s']:8.2f} "
          f"{pd['realtime_streams']:14.1f}")
    print(f"{'+ blocking reaction':34} {wr['seconds_per_clip']:8.3f} {wr['clips_per_s']:8.2f} "
          f"{wr['realtime_streams']:14.1f}")
    if "capacity_ratio" in report:
        verdict = "meets" if report["meets_target"] else "short of"
        print(f"dispider-vllm {report['ours']['max_realtime_streams']} streams: "
              f"{report['capacity_ratio']:.1f}x the reference with its reaction ({verdict} the "
              f"{report['target_ratio']}x target); {report['capacity_ratio_perception_decision_only']:.1f}x "
              "perception + decision only")


if __name__ == "__main__":
    sys.exit(main())
