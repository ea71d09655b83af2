"""Split a Dispider checkpoint into a vLLM-loadable reaction model and a perception/decision part.

    out/reaction/              config.json (model_type qwen2, DispiderReactionForCausalLM), tokenizer files,
                               model-0000k-of-0000n.safetensors + model.safetensors.index.json
    out/perception_decision/   config.json (normalised dispider_decision), tokenizer files, model.safetensors,
                               vision_tower/{config.json, preprocessor_config.json}
    out/dispider_split.json    the marker: source, its files' sizes and times, tensor counts

Tensors are streamed one at a time from the source shards into the output files (the header of each
output file is known before any tensor is read), so memory stays at one tensor whatever the model size.
A second call for an unchanged source finds the marker and does nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import locked
from .errors import CheckpointError
from .layout import (
    COMPACT_MODEL_TYPE_V2,
    DispiderCheckpoint,
    validated_in_order,
    open_checkpoint,
    read_json,
)
from .safetensors_io import (
    INDEX_FILE_NAME,
    SINGLE_FILE_NAME,
    TensorSource,
    iter_tensors,
    read_weight_files,
    write_safetensors_streaming,
)
from .shapes import (
    ExpectedTensor,
    Qwen2Dims,
    VisionDims,
    clip_vision_shapes,
    mlp2x_gelu_shapes,
    qwen2_shapes,
    require_choice,
    require_int,
    require_key,
)
from .tokens import COMPACT_PAD_TOKEN, IMAGE_TOKEN, SpecialTokenIds, copy_tokenizer_files, read_special_token_ids

if TYPE_CHECKING:
    import torch

REACTION_DIR_NAME = "reaction"
PERCEPTION_DECISION_DIR_NAME = "perception_decision"
VISION_TOWER_DIR_NAME = "vision_tower"
SPLIT_MARKER_NAME = "dispider_split.json"
SPLIT_FORMAT_VERSION = 1
REACTION_ARCHITECTURE = "DispiderReactionForCausalLM"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_PARTIAL_DIR_NAME = ".partial"
_LOCK_FILE_NAME = ".split.lock"
_OWN_NAMES = {REACTION_DIR_NAME, PERCEPTION_DECISION_DIR_NAME, SPLIT_MARKER_NAME, _PARTIAL_DIR_NAME, _LOCK_FILE_NAME}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SplitCheckpoint:
    """The two directories a split wrote."""

    reaction_dir: Path
    perception_decision_dir: Path


def _write_json(file: Path, value: dict[str, Any]) -> None:
    file.write_text(json.dumps(value, indent=2) + "\n")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    raise AssertionError


# ------------------------------------------------------------------------------------------------ configs


def reaction_config(ckpt: DispiderCheckpoint) -> dict[str, Any]:
    """The split reaction config: the Qwen2 fields plus what the vLLM reaction model needs to splice clips."""
    if ckpt.image_token_id is None:
        problem = "neither <image> nor <im_patch> is a single token of the reaction tokenizer"
        raise CheckpointError(ckpt.reaction_tokenizer_dir / "tokenizer.json", IMAGE_TOKEN, problem)
    return {
        **ckpt.reaction.fields,
        "model_type": "qwen2",
        "architectures": [REACTION_ARCHITECTURE],
        "compress_hidden_size": ckpt.compress_input_size,
        "clip_hidden_size": ckpt.clip_input_size,
        "image_token": ckpt.image_token,
        "image_token_id": ckpt.image_token_id,
        "keep_silent_token_id": ckpt.reaction_tokens.keep_silent,
        "im_end_token_id": ckpt.reaction_tokens.im_end,
        **ckpt.reaction_extra_config,
    }


def perception_decision_config(ckpt: DispiderCheckpoint) -> dict[str, Any]:
    """The compact config in v2 naming, with every perception key spelled out (defaults made explicit)."""
    return {
        **ckpt.compact.fields,
        "model_type": COMPACT_MODEL_TYPE_V2,
        "perception_vision_tower": VISION_TOWER_DIR_NAME,
        "perception_select_layer": ckpt.select_layer,
        "perception_select_feature": ckpt.select_feature,
        "perception_projector_type": "pool",
        "perception_hidden_size": ckpt.perception_hidden_size,
        "resolution": ckpt.resolution,
        "pool_num": ckpt.pool_num,
    }


# ------------------------------------------------------------------------------------------------ writing


def plan_shards(tensors: list[tuple[str, TensorSource]], max_shard_bytes: int) -> list[list[tuple[str, TensorSource]]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, TensorSource]]] = [[]]
    size = 0
    for name, source in tensors:
        if shards[-1] and size + source.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, source))
        size += source.nbytes
    return shards


def _write_reaction_weights(ckpt: DispiderCheckpoint, out: Path, max_shard_bytes: int, progress: Progress) -> None:
    shards = plan_shards(list(ckpt.reaction_tensors.items()), max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        written = write_safetensors_streaming(out / file_name, shard, iter_tensors(shard))
        weight_map.update({name: file_name for name, _ in shard})
        total += written
        progress(f"reaction: wrote {file_name} ({len(shard)} tensors, {_human_bytes(written)})")
    _write_json(out / INDEX_FILE_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def write_reaction_part(ckpt: DispiderCheckpoint, out: Path, max_shard_bytes: int, progress: Progress) -> None:
    out.mkdir(parents=True)
    _write_json(out / "config.json", reaction_config(ckpt))
    copy_tokenizer_files(ckpt.reaction_tokenizer_dir, out)
    # Generation defaults belong to the reaction model; HF generate in the reference applies them too.
    generation_config = ckpt.path / "generation_config.json"
    if generation_config.is_file():
        shutil.copyfile(generation_config, out / generation_config.name)
    _write_reaction_weights(ckpt, out, max_shard_bytes, progress)


def write_perception_decision_part(ckpt: DispiderCheckpoint, out: Path, progress: Progress) -> None:
    vision_dir = out / VISION_TOWER_DIR_NAME
    vision_dir.mkdir(parents=True)
    _write_json(out / "config.json", perception_decision_config(ckpt))
    _write_json(vision_dir / "config.json", ckpt.vision.fields)
    _write_json(vision_dir / "preprocessor_config.json", ckpt.preprocessor_config)
    copy_tokenizer_files(ckpt.compact_tokenizer_dir, out)
    plan = list(ckpt.perception_decision_tensors.items())
    written = write_safetensors_streaming(out / SINGLE_FILE_NAME, plan, iter_tensors(plan))
    progress(f"perception_decision: wrote {SINGLE_FILE_NAME} ({len(plan)} tensors, {_human_bytes(written)})")


# ------------------------------------------------------------------------------------------------- marker


def _fingerprint(ckpt: DispiderCheckpoint) -> list[list[Any]]:
    """Size and modification time of every source file: a changed source is split again."""
    rows = []
    for file in ckpt.source_files:
        stat = file.stat()
        rows.append([str(file), stat.st_size, stat.st_mtime_ns])
    return rows


def _marker(ckpt: DispiderCheckpoint) -> dict[str, Any]:
    return {
        "split_format_version": SPLIT_FORMAT_VERSION,
        "source": str(ckpt.path),
        "source_format_version": ckpt.format_version,
        "tensor_counts": {
            REACTION_DIR_NAME: len(ckpt.reaction_tensors),
            PERCEPTION_DECISION_DIR_NAME: len(ckpt.perception_decision_tensors),
            "dropped": len(ckpt.dropped_tensors),
        },
        "source_files": _fingerprint(ckpt),
    }


def _is_up_to_date(out_dir: Path, marker: dict[str, Any]) -> bool:
    marker_file = out_dir / SPLIT_MARKER_NAME
    if not marker_file.is_file():
        return False
    try:
        existing = json.loads(marker_file.read_text())
    except ValueError:
        return False
    parts_present = all((out_dir / name / "config.json").is_file() for name in (REACTION_DIR_NAME, PERCEPTION_DECISION_DIR_NAME))
    return existing == marker and parts_present


def _check_out_dir_is_ours(out_dir: Path) -> None:
    """Only ever replace what a split wrote: refuse a directory holding anything else."""
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in _OWN_NAMES)
    if foreign:
        problem = f"output directory holds files a split did not write ({', '.join(foreign[:3])}); use an empty one"
        raise CheckpointError(out_dir, None, problem)


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    new.rename(target)


def split_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Progress | None = None,
) -> SplitCheckpoint:
    """Split the Dispider checkpoint ``src`` into ``out_dir``/reaction and ``out_dir``/perception_decision.

    Validates ``src`` first (CheckpointError on any problem); a no-op when ``out_dir`` already holds the
    split of the unchanged source. ``progress`` receives one line per written file.
    """
    report = progress or (lambda line: None)
    ckpt = open_checkpoint(src)
    out_dir = Path(out_dir).expanduser().resolve()
    result = SplitCheckpoint(out_dir / REACTION_DIR_NAME, out_dir / PERCEPTION_DECISION_DIR_NAME)
    marker = _marker(ckpt)
    out_dir.mkdir(parents=True, exist_ok=True)
    with locked(out_dir / _LOCK_FILE_NAME):
        if _is_up_to_date(out_dir, marker):
            report(f"up to date: {out_dir}")
            return result
        _check_out_dir_is_ours(out_dir)
        # Write everything aside first: a crash leaves the old split (without its marker) or nothing half-done.
        partial = out_dir / _PARTIAL_DIR_NAME
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        write_reaction_part(ckpt, partial / REACTION_DIR_NAME, max_shard_bytes, report)
        write_perception_decision_part(ckpt, partial / PERCEPTION_DECISION_DIR_NAME, report)
        (out_dir / SPLIT_MARKER_NAME).unlink(missing_ok=True)
        _replace_dir(partial / REACTION_DIR_NAME, result.reaction_dir)
        _replace_dir(partial / PERCEPTION_DECISION_DIR_NAME, result.perception_decision_dir)
        partial.rmdir()
        tmp_marker = out_dir / (SPLIT_MARKER_NAME + ".tmp")
        _write_json(tmp_marker, marker)
        os.replace(tmp_marker, out_dir / SPLIT_MARKER_NAME)
    report(f"split done: {out_dir}")
    return result


# -------------------------------------------------------------------------------- reading the split part


@dataclass(frozen=True)
class PerceptionDecisionPart:
    """The perception/decision directory written by a split, validated.

    ``safetensors_path`` holds ``language_model.*`` (a Qwen2Model state dict), ``mm_projector.{0,2}.*``,
    ``silent_head.weight`` and ``vision_tower.vision_model.*`` (a CLIPVisionModel state dict under
    ``vision_tower.``).
    """

    path: Path
    config: dict[str, Any]
    language: Qwen2Dims
    vision: VisionDims
    vision_tower_dir: Path
    preprocessor_config: dict[str, Any]
    tokenizer_dir: Path
    safetensors_path: Path
    tokens: SpecialTokenIds
    select_layer: int
    select_feature: str
    resolution: int
    pool_num: int
    perception_hidden_size: int  # mm_projector input: 4 x CLIP hidden

    def load_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix``, with the prefix removed: ``"language_model."`` gives a Qwen2Model
        state dict; ``"vision_tower.vision_model."`` a CLIPVisionModel one as transformers 5 modules name it
        (their state dict has no ``vision_model.`` level); ``"mm_projector."`` the Sequential's."""
        from safetensors import safe_open

        with safe_open(str(self.safetensors_path), framework="pt") as handle:
            return {key[len(prefix) :]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}

    def language_model_config(self):
        """A transformers Qwen2Config for ``language_model.*``."""
        return self.language.to_hf_config()

    def vision_tower_config(self):
        """A transformers CLIPVisionConfig for ``vision_tower.*``."""
        return self.vision.to_hf_config()


def open_perception_decision(path: str | Path) -> PerceptionDecisionPart:
    """Read and validate the perception_decision directory of a split (shapes checked from headers)."""
    path = Path(path).expanduser().resolve()
    config_file = path / "config.json"
    config = read_json(config_file)
    require_choice(config, "model_type", config_file, (COMPACT_MODEL_TYPE_V2,))
    language = Qwen2Dims.from_config(config, config_file)
    vision_tower_dir = path / require_key(config, "perception_vision_tower", config_file)
    vision = VisionDims.from_config(read_json(vision_tower_dir / "config.json"), vision_tower_dir / "config.json")
    perception_hidden = require_int(config, "perception_hidden_size", config_file)

    weights = read_weight_files(path)
    expected = {
        **qwen2_shapes(language, "language_model.", lm_head=None),
        **mlp2x_gelu_shapes("mm_projector.", perception_hidden, language.hidden_size),
        "silent_head.weight": ExpectedTensor((1, language.hidden_size)),
        **clip_vision_shapes(vision, "vision_tower."),
    }
    validated_in_order(weights.tensors, expected, weights.listing, lambda name: name)
    return PerceptionDecisionPart(
        path=path,
        config=config,
        language=language,
        vision=vision,
        vision_tower_dir=vision_tower_dir,
        preprocessor_config=read_json(vision_tower_dir / "preprocessor_config.json"),
        tokenizer_dir=path,
        safetensors_path=weights.listing,
        tokens=read_special_token_ids(path, default_pad=COMPACT_PAD_TOKEN),
        select_layer=require_int(config, "perception_select_layer", config_file),
        select_feature=require_key(config, "perception_select_feature", config_file),
        resolution=require_int(config, "resolution", config_file),
        pool_num=require_int(config, "pool_num", config_file),
        perception_hidden_size=perception_hidden,
    )
