"""dispider-checkpoint: make, inspect and split Dispider checkpoints from the command line."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

PROG = "dispider-checkpoint"
EXIT_ERROR = 2

DESCRIPTION = """\
Make, inspect and split Dispider checkpoints (v2 released layout, or v1 layout).

A Dispider checkpoint holds three networks: a Qwen2 reaction model (7B), a compact Qwen2 perception/decision
model (1.5B) with a CLIP vision tower, a pool projector and a silent_head. `split` writes them as two parts:
OUT/reaction (a Qwen2 model vLLM loads, plus its projectors) and OUT/perception_decision.
"""

EPILOG = """\
examples:
  dispider-checkpoint make-random /tmp/tiny                 tiny random v2 checkpoint
  dispider-checkpoint make-random /tmp/tiny1 --layout v1    tiny random v1 checkpoint
  dispider-checkpoint inspect /models/Dispider              sizes, token ids, tensor counts
  dispider-checkpoint split /models/Dispider /models/Dispider-split
"""

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str) -> int:
    """'2GiB', '500MB', '1048576' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GiB, 500MB, 1048576)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    make = commands.add_parser(
        "make-random",
        help="write a tiny random checkpoint in the real layout",
        description="Write a tiny random Dispider checkpoint (real key names and layout, tiny sizes, working "
        "tokenizers). v2 is written into OUT; v1 writes OUT/dispider-long-qwen2-reaction and "
        "OUT/dispider-stream-qwen2-compressor. Prints the directory to open.",
    )
    make.add_argument("out", metavar="OUT", help="output directory")
    make.add_argument("--layout", choices=("v1", "v2"), default="v2", help="checkpoint layout (default: v2)")
    make.add_argument("--seed", type=int, default=0, help="random seed; one seed gives identical files (default: 0)")

    inspect = commands.add_parser(
        "inspect",
        help="validate a checkpoint and print its normalised view",
        description="Validate a Dispider checkpoint (configs, tokenizers, every tensor's shape, without loading "
        "tensors) and print sizes, special-token ids and tensor counts per part.",
    )
    inspect.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (the reaction dir for v1)")
    inspect.add_argument("--json", action="store_true", help="print the view as JSON")

    split = commands.add_parser(
        "split",
        help="split a checkpoint into OUT/reaction and OUT/perception_decision",
        description="Split a Dispider checkpoint into OUT/reaction (Qwen2 + projectors, loadable by vLLM) and "
        "OUT/perception_decision (compact Qwen2, CLIP tower, pool projector, silent_head). Streams tensor by "
        "tensor; a second run on an unchanged source does nothing.",
    )
    split.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory (the reaction dir for v1)")
    split.add_argument("out", metavar="OUT", help="output directory (empty, or a previous split)")
    split.add_argument(
        "--max-shard-size", type=parse_size, default="2GiB", metavar="SIZE", help="largest reaction shard (default: 2GiB)"
    )
    return parser


def _describe_tokens(ids: dict[str, int | None]) -> str:
    return ", ".join(f"{name}={value}" for name, value in ids.items())


def format_summary(view: dict) -> str:
    """The human-readable form of DispiderCheckpoint.summary()."""
    r, c, v = view["reaction"], view["compact"], view["vision"]

    def qwen2(d: dict) -> str:
        return (
            f"Qwen2 hidden {d['hidden_size']}, {d['num_hidden_layers']} layers, {d['num_attention_heads']} heads / "
            f"{d['num_key_value_heads']} KV (head_dim {d['head_dim']}), intermediate {d['intermediate_size']}, "
            f"vocab {d['vocab_size']}"
        )

    mib = {part: n / 2**20 for part, n in view["bytes"].items()}
    counts = view["tensors"]
    return "\n".join(
        [
            f"Dispider checkpoint, layout v{view['format_version']}: {view['path']}",
            f"  reaction      {qwen2(r)}",
            f"  projectors    compress_projector {view['compress_input_size']} -> {r['hidden_size']}, "
            f"clip_projector {view['clip_input_size']} -> {r['hidden_size']}",
            f"  compact       {qwen2(c)}",
            f"                {view['compact_dir']}",
            f"  vision        CLIP image {v['image_size']}, patch {v['patch_size']}, hidden {v['hidden_size']}, "
            f"{v['num_hidden_layers']} layers, {v['num_attention_heads']} heads",
            f"  perception    select layer {view['select_layer']} ({view['select_feature']}), resolution "
            f"{view['resolution']}, pool_num {view['pool_num']}, mm_projector {view['perception_hidden_size']} -> "
            f"{c['hidden_size']}",
            f"  reaction ids  {_describe_tokens(view['reaction_tokens'])}",
            f"                image placeholder {view['image_token']} = {view['image_token_id']}",
            f"  compact ids   {_describe_tokens(view['compact_tokens'])}",
            f"  tensors       reaction {counts['reaction']} ({mib['reaction']:.1f} MiB), perception_decision "
            f"{counts['perception_decision']} ({mib['perception_decision']:.1f} MiB), dropped {counts['dropped']}",
        ]
    )


def _run(args: argparse.Namespace) -> None:
    # Imported here so that --help and argument errors stay fast.
    from . import make_random_checkpoint, open_checkpoint, split_checkpoint

    if args.command == "make-random":
        print(make_random_checkpoint(args.out, seed=args.seed, layout=args.layout))
    elif args.command == "inspect":
        view = open_checkpoint(args.checkpoint).summary()
        print(json.dumps(view, indent=2) if args.json else format_summary(view))
    elif args.command == "split":
        result = split_checkpoint(args.checkpoint, args.out, max_shard_bytes=args.max_shard_size, progress=print)
        print(f"reaction:            {result.reaction_dir}")
        print(f"perception_decision: {result.perception_decision_dir}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import CheckpointError

    try:
        _run(args)
    except (CheckpointError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
