"""Reaction model vs plain vLLM Qwen2, same shapes, same run: decode ms/step and time to first token.

    python benchmarks/reaction_bench.py --out benchmarks/results/reaction_h200.json          # GPU, Qwen2-7B shapes
    python benchmarks/reaction_bench.py --tiny --out /tmp/reaction_cpu.json                    # CPU smoke run

Both sides use ``load_format="dummy"`` (random weights, nothing downloaded). Each side runs in its own
subprocess, one after the other, so they get the same GPU to themselves.
- decode: ``--batches`` requests (default 1 and 64) decode together; a step counts once every request in the
  batch has its first token (pure decode steps only); the figure is the median step time.
  Plain requests are text of the same length as the Dispider prompt (a k=1, t=1 bundle plus text).
- first token: one request of about 4,400 positions (plain: text tokens; Dispider: a k=4, t=48 bundle plus
  text), each repetition with new inputs so the prefix cache cannot help; the median of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN2_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", model_type="qwen2", torch_dtype="bfloat16",
)
TINY = dict(QWEN2_7B, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, torch_dtype="float32")
DISPIDER_FIELDS = dict(clip_hidden_size=4096, compress_hidden_size=1536)
TINY_DISPIDER_FIELDS = dict(clip_hidden_size=256, compress_hidden_size=128)
TTFT_POSITIONS = 4400 + 64  # the bundle plus 64 text tokens
TTFT_BUNDLE = (4, 48)  # k, t: 1088*4 + 48 = 4400 bundle positions
DECODE_BUNDLE = (1, 1)


# ------------------------------------------------------------------------------------------- model dirs
def write_model_dirs(root: Path, tiny: bool) -> dict[str, Path]:
    """A plain Qwen2 dir and a Dispider reaction dir of the same shapes, with the tiny checkpoint's tokenizer."""
    from dispider_vllm.checkpoint.random import ensure_default_checkpoint

    tokenizer_dir = Path(ensure_default_checkpoint().split.reaction_dir)
    tokenizer_config = json.loads((tokenizer_dir / "config.json").read_text())
    shapes = TINY if tiny else QWEN2_7B
    dirs = {}
    for name, extra in (("plain", {}), ("dispider", TINY_DISPIDER_FIELDS if tiny else DISPIDER_FIELDS)):
        model_dir = root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        config = dict(shapes, **extra)
        config["architectures"] = ["DispiderReactionForCausalLM"] if extra else ["Qwen2ForCausalLM"]
        if extra:
            config["image_token_id"] = tokenizer_config["image_token_id"]
        (model_dir / "config.json").write_text(json.dumps(config, indent=1))
        for file in tokenizer_dir.iterdir():
            if "token" in file.name or file.name in ("vocab.json", "merges.txt"):
                (model_dir / file.name).write_bytes(file.read_bytes())
        dirs[name] = model_dir
    return dirs


# ------------------------------------------------------------------------------------------- one side
def run_side(side: str, model_dir: Path, args) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    tiny = args.tiny
    llm = LLM(
        str(model_dir),
        load_format="dummy",
        dtype="float32" if tiny else "bfloat16",
        max_model_len=8192,
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=args.max_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization,
        limit_mm_per_prompt={"image": 1} if side == "dispider" else None,
        seed=0,
        enforce_eager=tiny,
    )
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Ordinary tokens only: a random special token (the image placeholder above all) would change the prompt.
    ordinary = torch.tensor(sorted(set(range(len(tokenizer))) - set(tokenizer.all_special_ids)))
    generator = torch.Generator().manual_seed(0)

    def random_ids(n: int) -> list[int]:
        return ordinary[torch.randint(0, len(ordinary), (n,), generator=generator)].tolist()
    dtype = torch.float32 if tiny else torch.bfloat16

    def make_prompt(positions: int, bundle: tuple[int, int], salt: int) -> dict:
        if side == "plain":
            return {"prompt_token_ids": random_ids(positions)}
        k, t = bundle
        image = config["image_token_id"]
        g = torch.Generator().manual_seed(salt)
        mm = {
            "clip_raw": torch.randn(k, 1024, config["clip_hidden_size"], generator=g).to(dtype),
            "clip_memory": torch.randn(k, 64, config["compress_hidden_size"], generator=g).to(dtype),
            "global_memory": torch.randn(t, config["compress_hidden_size"], generator=g).to(dtype),
        }
        text_len = positions - (1088 * k + t)
        ids = random_ids(text_len // 2) + [image] + random_ids(text_len - text_len // 2)
        # The server names each bundle (stream, clip, retrieved clips); vLLM then skips hashing 33 MB of features.
        return {"prompt_token_ids": ids, "multi_modal_data": {"image": mm}, "multi_modal_uuids": {"image": [f"bundle-{salt}"]}}

    # Warm-up: compile paths for both phases.
    llm.generate([make_prompt(1200, DECODE_BUNDLE, 999)], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)

    result = {"side": side}
    decode_positions = 1088 * DECODE_BUNDLE[0] + DECODE_BUNDLE[1] + 64
    for batch in args.batches:
        prompts = [make_prompt(decode_positions, DECODE_BUNDLE, 100_000 + batch * 1000 + i) for i in range(batch)]
        result[f"decode_ms_per_step_batch{batch}"] = decode_step_ms(llm, prompts, args.decode_tokens)
    ttfts = []
    for repeat in range(args.repeats):
        prompt = make_prompt(TTFT_POSITIONS, TTFT_BUNDLE, 900_000 + repeat)
        start = time.perf_counter()
        out = llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)[0]
        ttfts.append((time.perf_counter() - start) * 1000)
        result["ttft_prompt_positions"] = len(out.prompt_token_ids)
    result["ttft_ms"] = statistics.median(ttfts)
    result["ttft_ms_all"] = ttfts
    return result


def decode_step_ms(llm, prompts: list[dict], decode_tokens: int) -> float:
    """Median wall time of the engine steps in which every request of the batch is decoding.

    The engine's token budget takes every prefill in one or two steps, so the steps that follow are pure decode;
    detokenization is off so the figure is the engine's, not the frontend's.
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=decode_tokens, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"decode-{len(prompts)}-{i}", prompt, params)
    started: set[str] = set()
    finished = 0
    step_times = []
    while engine.has_unfinished_requests():
        all_decoding = len(started) == len(prompts) and finished == 0
        before = time.perf_counter()
        outputs = engine.step()
        elapsed = time.perf_counter() - before
        for output in outputs:
            if output.outputs and output.outputs[0].token_ids:
                started.add(output.request_id)
            finished += output.finished
        if all_decoding and finished == 0:
            step_times.append(elapsed * 1000)
    return statistics.median(step_times) if step_times else float("nan")


# ------------------------------------------------------------------------------------------- driver
def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - only a label
        pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reaction_h200.json"))
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (a smoke run, not a figure)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--max-batched-tokens", type=int, default=98304,
                        help="engine token budget per step: large enough to prefill a whole decode batch at once")
    parser.add_argument("--side", choices=["plain", "dispider"], help=argparse.SUPPRESS)  # internal: one side
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.side:  # child process: measure one side, print its JSON last
        print("RESULT " + json.dumps(run_side(args.side, args.model_dir, args)), flush=True)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        dirs = write_model_dirs(Path(tmp), args.tiny)
        sides = {}
        for side in ("plain", "dispider"):
            print(f"[reaction-bench] {side}: starting vLLM", flush=True)
            child = [sys.executable, __file__, "--side", side, "--model-dir", str(dirs[side]),
                     "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats),
                     "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                     "--max-batched-tokens", str(args.max_batched_tokens), "--batches", *map(str, args.batches)]
            if args.tiny:
                child.append("--tiny")
            done = subprocess.run(child, capture_output=True, text=True)
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
                raise SystemExit(f"{side} side failed (exit {done.returncode})")
            sides[side] = json.loads(lines[-1][len("RESULT "):])
            print(f"[reaction-bench] {side}: {sides[side]}", flush=True)

    report = summarize(sides, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0


def summarize(sides: dict, args) -> dict:
    plain, dispider = sides["plain"], sides["dispider"]
    ratios = {}
    for batch in args.batches:
        key = f"decode_ms_per_step_batch{batch}"
        ratios[f"decode_batch{batch}_dispider_over_plain"] = dispider[key] / plain[key]
    ratios["ttft_dispider_over_plain"] = dispider["ttft_ms"] / plain["ttft_ms"]
    import vllm

    return {
        "benchmark": "reaction",
        "device": device_name(),
        "shapes": "tiny" if args.tiny else "Qwen2-7B (dummy weights, bf16)",
        "vllm": vllm.__version__,
        "command": "python benchmarks/reaction_bench.py " + " ".join(sys.argv[1:]),
        "plain_qwen2": plain,
        "dispider_reaction": dispider,
        "ratios": ratios,
        "targets": {"decode_within": 1.05, "ttft_within": 1.3},
        "meets_targets": all(v <= 1.05 for k, v in ratios.items() if k.startswith("decode"))
        and ratios["ttft_dispider_over_plain"] <= 1.3,
    }


def print_table(report: dict) -> None:
    plain, dispider, ratios = report["plain_qwen2"], report["dispider_reaction"], report["ratios"]
    print(f"\nReaction model on {report['device']} ({report['shapes']})")
    print(f"{'figure':34} {'plain Qwen2':>12} {'Dispider':>12} {'ratio':>7}")
    for key in [k for k in plain if k.startswith("decode_ms")]:
        batch = key.rsplit("batch", 1)[1]
        print(f"{'decode ms/step, batch ' + batch:34} {plain[key]:12.2f} {dispider[key]:12.2f} "
              f"{ratios[f'decode_batch{batch}_dispider_over_plain']:7.3f}")
    print(f"{'first token ms, ~4400 positions':34} {plain['ttft_ms']:12.1f} {dispider['ttft_ms']:12.1f} "
          f"{ratios['ttft_dispider_over_plain']:7.3f}")


if __name__ == "__main__":
    sys.exit(main())
