"""A split checkpoint with real model shapes and no weights, for GPU benchmarks (nothing to download or carry).

``make_dummy_split(out_dir)`` writes the two parts the server reads (``reaction/`` and ``perception_decision/``)
with Qwen2-7B / Qwen2-1.5B / CLIP ViT-L/14-224 configs, the tiny random checkpoint's tokenizers, and
``"dispider_dummy_weights": true`` in both configs. The server then starts vLLM with ``load_format="dummy"``
and builds the sidecar's modules with random weights on their device. Answers are noise; speed is real.

    python -m dispider_vllm.checkpoint.dummy OUT_DIR [--shapes real|tiny]
    dispider-serve --checkpoint OUT_DIR ...
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from dispider_vllm.checkpoint.random import ensure_default_checkpoint
from dispider_vllm.checkpoint.split import SPLIT_MARKER_NAME

DUMMY_FLAG = "dispider_dummy_weights"

REACTION_7B = dict(
    hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
    vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0, torch_dtype="bfloat16",
)
COMPACT_1_5B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, torch_dtype="bfloat16",
)
CLIP_L14_224 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=14, hidden_act="quick_gelu", projection_dim=768,
)


def has_dummy_weights(config: dict) -> bool:
    return bool(config.get(DUMMY_FLAG))


def make_dummy_split(out_dir: str | Path, *, shapes: str = "real") -> Path:
    """Write a weightless split of real (or, for a CPU check, tiny) shapes; returns ``out_dir``."""
    out_dir = Path(out_dir)
    tiny = ensure_default_checkpoint()
    for part in ("reaction", "perception_decision"):
        _copy_without_weights(Path(getattr(tiny, f"{part}_dir")), out_dir / part)
    if shapes == "real":
        _update_json(out_dir / "reaction" / "config.json", dict(REACTION_7B, clip_hidden_size=4096, compress_hidden_size=1536))
        _update_json(out_dir / "perception_decision" / "config.json", dict(COMPACT_1_5B, perception_hidden_size=4096))
        _update_json(out_dir / "perception_decision" / "vision_tower" / "config.json", CLIP_L14_224)
    for part in ("reaction", "perception_decision"):
        _update_json(out_dir / part / "config.json", {DUMMY_FLAG: True})
    (out_dir / SPLIT_MARKER_NAME).write_text(json.dumps({"dummy_weights": True, "shapes": shapes}, indent=1))
    return out_dir


def _copy_without_weights(source: Path, target: Path) -> None:
    shutil.copytree(
        source, target, dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"),
    )


def _update_json(path: Path, fields: dict) -> None:
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--shapes", choices=["real", "tiny"], default="real")
    args = parser.parse_args(argv)
    print(make_dummy_split(args.out_dir, shapes=args.shapes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
