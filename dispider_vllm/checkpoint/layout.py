"""Open a Dispider checkpoint, v1 or v2 layout (DISPIDER.md section 5), into one validated, typed view.

Both layouts are normalised to the names the split writes:

    reaction part            model.embed_tokens.weight, model.layers.N.*, model.norm.weight, lm_head.weight,
                             compress_projector.{0,2}.*, clip_projector.{0,2}.*
    perception_decision part language_model.* (a Qwen2Model), mm_projector.{0,2}.*, silent_head.weight,
                             vision_tower.vision_model.* (a CLIPVisionModel)

Opening reads configs, tokenizer files and safetensors headers only; no tensor is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError
from .safetensors_io import TensorSource, WeightFiles, iter_tensors, read_weight_files
from .shapes import (
    ExpectedTensor,
    Qwen2Dims,
    ShapeTable,
    VisionDims,
    clip_vision_shapes,
    mlp2x_gelu_shapes,
    qwen2_shapes,
    require_choice,
    require_int,
    require_key,
)
from .tokens import (
    COMPACT_PAD_TOKEN,
    IM_PATCH_TOKEN,
    IMAGE_TOKEN,
    SpecialTokenIds,
    check_ids_fit_vocab,
    read_special_token_ids,
    tokenizer_files,
)

if TYPE_CHECKING:
    import torch

REACTION_MODEL_TYPE_V2 = "dispider_reaction"
REACTION_MODEL_TYPE_V1 = "long"
COMPACT_MODEL_TYPE_V2 = "dispider_decision"
COMPACT_MODEL_TYPE_V1 = "stream_ground_qwen"
COMPRESSORS_WITHOUT_SILENT_HEAD = ("llava_qwen", "ground_qwen")

MANIFEST_FILE_NAME = "dispider_checkpoint_manifest.json"
EMBEDDED_PREFIX = "model.compressor.compressor."
PROJECTOR_TYPES = ("mlp2x_gelu",)
PERCEPTION_PROJECTOR_TYPES = ("pool",)

# The CLIP select layer is read from the config; the value is not in the Dispider sources, so when a
# config leaves it out we use LLaVA's default, the second-to-last layer.
DEFAULT_SELECT_LAYER = -2
DEFAULT_SELECT_FEATURE = "patch"  # drop the CLS token, keep the 256 patch tokens

# Buffers older transformers versions saved with the weights; no module reads them from a state dict.
NON_PERSISTENT_BUFFER_SUFFIXES = ("rotary_emb.inv_freq", "embeddings.position_ids")

# v1 configs may name the vision tower by its hub id; no hub is reachable, so the public
# openai/clip-vit-large-patch14 config (the tower of DISPIDER.md section 1) is known here.
CLIP_L14_224_NAME = "clip-vit-large-patch14"
CLIP_L14_224_CONFIG = {
    "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "projection_dim": 768,
    "num_hidden_layers": 24, "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 14,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
}  # fmt: skip
CLIP_PREPROCESSOR_CONFIG = {
    "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224}, "do_rescale": True,
    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_convert_rgb": True,
}  # fmt: skip


@dataclass(frozen=True)
class DroppedTensor:
    """A source tensor the split does not write, and why."""

    source: TensorSource
    reason: str


@dataclass(frozen=True)
class DispiderCheckpoint:
    """A validated Dispider checkpoint, normalised over the v1 and v2 layouts."""

    path: Path
    format_version: int  # 1 or 2
    reaction: Qwen2Dims  # the Qwen2-7B reaction LLM
    compress_input_size: int  # compress_projector input: the compact LLM width (1536 real)
    clip_input_size: int  # clip_projector input: the 2x2-merged CLIP width (4096 real)
    compact_dir: Path  # perception_decision dir (v2) or mm_compressor dir (v1)
    compact: Qwen2Dims  # the Qwen2-1.5B perception/decision LLM
    vision: VisionDims  # the CLIP vision tower
    preprocessor_config: dict[str, Any]  # CLIPImageProcessor settings
    select_layer: int
    select_feature: str
    resolution: int  # merged CLIP tokens per frame (64)
    pool_num: int  # pooled memory slots per frame (4)
    perception_hidden_size: int  # mm_projector input: the merged CLIP width (4 x CLIP hidden)
    reaction_tokenizer_dir: Path
    compact_tokenizer_dir: Path
    reaction_tokens: SpecialTokenIds
    compact_tokens: SpecialTokenIds
    reaction_tensors: dict[str, TensorSource]  # split name -> source, in writing order
    perception_decision_tensors: dict[str, TensorSource]
    dropped_tensors: tuple[DroppedTensor, ...]
    source_files: tuple[Path, ...]  # every file this view was read from
    reaction_extra_config: dict[str, Any] = field(default_factory=dict)  # e.g. tokenizer_model_max_length

    @property
    def image_token_id(self) -> int | None:
        """The reaction placeholder id: ``<image>`` if it is one token of the reaction tokenizer, else ``<im_patch>``."""
        return self.reaction_tokens.image if self.reaction_tokens.image is not None else self.reaction_tokens.im_patch

    @property
    def image_token(self) -> str | None:
        if self.reaction_tokens.image is not None:
            return IMAGE_TOKEN
        return IM_PATCH_TOKEN if self.reaction_tokens.im_patch is not None else None

    def iter_reaction_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(split name, tensor) for the reaction part, one tensor loaded at a time."""
        return iter_tensors(self.reaction_tensors.items())

    def iter_perception_decision_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(split name, tensor) for the perception/decision part, one tensor loaded at a time."""
        return iter_tensors(self.perception_decision_tensors.items())

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description (what ``dispider-checkpoint inspect`` prints)."""

        def dims(d: Qwen2Dims | VisionDims) -> dict[str, Any]:
            return {k: v for k, v in d.__dict__.items() if k != "fields"}

        def part_bytes(tensors: dict[str, TensorSource]) -> int:
            return sum(t.nbytes for t in tensors.values())

        return {
            "path": str(self.path),
            "format_version": self.format_version,
            "reaction": dims(self.reaction),
            "compress_input_size": self.compress_input_size,
            "clip_input_size": self.clip_input_size,
            "compact_dir": str(self.compact_dir),
            "compact": dims(self.compact),
            "vision": dims(self.vision),
            "select_layer": self.select_layer,
            "select_feature": self.select_feature,
            "resolution": self.resolution,
            "pool_num": self.pool_num,
            "perception_hidden_size": self.perception_hidden_size,
            "reaction_tokenizer_dir": str(self.reaction_tokenizer_dir),
            "compact_tokenizer_dir": str(self.compact_tokenizer_dir),
            "reaction_tokens": self.reaction_tokens.as_dict(),
            "compact_tokens": self.compact_tokens.as_dict(),
            "image_token": self.image_token,
            "image_token_id": self.image_token_id,
            "tensors": {
                "reaction": len(self.reaction_tensors),
                "perception_decision": len(self.perception_decision_tensors),
                "dropped": len(self.dropped_tensors),
            },
            "bytes": {
                "reaction": part_bytes(self.reaction_tensors),
                "perception_decision": part_bytes(self.perception_decision_tensors),
            },
        }


# --------------------------------------------------------------------------------------------------- reading


def read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(file, None, "missing file")
    try:
        value = json.loads(file.read_text())
    except ValueError as exc:
        raise CheckpointError(file, None, f"not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CheckpointError(file, None, "expected a JSON object")
    return value


def resolve_dir(value: str, *bases: Path) -> Path | None:
    """A directory named in a config: absolute, relative to one of ``bases``, or moved next to them."""
    named = Path(value).expanduser()
    candidates = [named] if named.is_absolute() else [base / named for base in bases]
    candidates += [base / named.name for base in bases]  # the tree was moved as a whole
    return next((c.resolve() for c in candidates if c.is_dir()), None)


def merged_clip_width(value: int, key: str, file: Path, vision: VisionDims) -> int:
    """The mm_projector input width. v1 configs give the CLIP width (1024) and the pool projector
    concatenates 2x2 patches; the normalised value is always the merged width (4096)."""
    merged = 4 * vision.hidden_size
    if value in (merged, vision.hidden_size):
        return merged
    raise CheckpointError(file, key, f"{value} is neither the CLIP width {vision.hidden_size} nor the merged width {merged}")


def check_resolution(resolution: int, file: Path, vision: VisionDims) -> None:
    merged_per_frame = (vision.patches_per_side // 2) ** 2
    if resolution != merged_per_frame:
        raise CheckpointError(
            file, "resolution", f"{resolution} does not match the {merged_per_frame} 2x2-merged patches of a frame"
        )


@dataclass
class _LayoutFields:
    """What the two layouts say, read into common fields before assembly."""

    format_version: int
    reaction_config_file: Path
    reaction_config: dict[str, Any]
    compress_input: tuple[int, str]  # (value, config key)
    clip_input: tuple[int, str]
    compact_dir: Path
    compact_config_file: Path
    compact_config: dict[str, Any]
    vision: VisionDims
    preprocessor_config: dict[str, Any]
    select_layer: int
    select_feature: str
    resolution: int
    pool_num: int
    perception_hidden: tuple[int, str]
    compact_weights: WeightFiles | None  # v1 only: the compressor's own safetensors
    files: list[Path]


def _read_vision_dir(vision_dir: Path, files: list[Path]) -> tuple[VisionDims, dict[str, Any]]:
    config_file, preprocessor_file = vision_dir / "config.json", vision_dir / "preprocessor_config.json"
    vision = VisionDims.from_config(read_json(config_file), config_file)
    preprocessor = read_json(preprocessor_file)
    files += [config_file, preprocessor_file]
    return vision, preprocessor


def _read_v2(path: Path, config_file: Path, config: dict[str, Any]) -> _LayoutFields:
    files = [config_file]
    version = require_int(config, "checkpoint_format_version", config_file)
    if version != 2:
        raise CheckpointError(config_file, "checkpoint_format_version", f"{version}; a dispider_reaction config must say 2")
    require_choice(config, "decision_projector_type", config_file, PROJECTOR_TYPES)
    require_choice(config, "perception_projector_type", config_file, PROJECTOR_TYPES)

    compact_dir_value = require_key(config, "perception_decision", config_file)
    compact_dir = resolve_dir(compact_dir_value, path)
    if compact_dir is None:
        raise CheckpointError(config_file, "perception_decision", f"directory {compact_dir_value!r} not found")
    compact_file = compact_dir / "config.json"
    compact = read_json(compact_file)
    files.append(compact_file)
    if compact.get("model_type") != COMPACT_MODEL_TYPE_V2:
        problem = f"unknown model_type {compact.get('model_type')!r}; expected {COMPACT_MODEL_TYPE_V2!r}"
        raise CheckpointError(compact_file, "model_type", problem)
    require_choice(compact, "perception_projector_type", compact_file, PERCEPTION_PROJECTOR_TYPES)

    tower_value = require_key(compact, "perception_vision_tower", compact_file)
    vision_dir = resolve_dir(tower_value, compact_dir)
    if vision_dir is None:
        raise CheckpointError(compact_file, "perception_vision_tower", f"directory {tower_value!r} not found")
    vision, preprocessor = _read_vision_dir(vision_dir, files)

    return _LayoutFields(
        format_version=2,
        reaction_config_file=config_file,
        reaction_config=config,
        compress_input=(require_int(config, "decision_hidden_size", config_file), "decision_hidden_size"),
        clip_input=(require_int(config, "perception_hidden_size", config_file), "perception_hidden_size"),
        compact_dir=compact_dir,
        compact_config_file=compact_file,
        compact_config=compact,
        vision=vision,
        preprocessor_config=preprocessor,
        select_layer=int(compact.get("perception_select_layer", DEFAULT_SELECT_LAYER)),
        select_feature=str(compact.get("perception_select_feature", DEFAULT_SELECT_FEATURE)),
        resolution=require_int(compact, "resolution", compact_file),
        pool_num=require_int(compact, "pool_num", compact_file),
        perception_hidden=(require_int(compact, "perception_hidden_size", compact_file), "perception_hidden_size"),
        compact_weights=None,
        files=files,
    )


def _read_v1_vision(compact_dir: Path, compact_file: Path, tower_value: str, files: list[Path]):
    vision_dir = resolve_dir(tower_value, compact_dir, compact_dir.parent)
    if vision_dir is not None:
        return _read_vision_dir(vision_dir, files)
    if tower_value.rstrip("/").endswith(CLIP_L14_224_NAME):
        return VisionDims.from_config(CLIP_L14_224_CONFIG, compact_file), dict(CLIP_PREPROCESSOR_CONFIG)
    raise CheckpointError(compact_file, "mm_vision_tower", f"directory {tower_value!r} not found")


def _read_v1(path: Path, config_file: Path, config: dict[str, Any]) -> _LayoutFields:
    files = [config_file]
    require_choice(config, "compress_projector_type", config_file, PROJECTOR_TYPES)
    require_choice(config, "clip_projector_type", config_file, PROJECTOR_TYPES)
    compressor_value = require_key(config, "mm_compressor", config_file)
    compact_dir = resolve_dir(compressor_value, path, path.parent)
    if compact_dir is None:
        raise CheckpointError(config_file, "mm_compressor", f"directory {compressor_value!r} not found")

    compact_file = compact_dir / "config.json"
    compact = read_json(compact_file)
    files.append(compact_file)
    compact_type = compact.get("model_type")
    if compact_type in COMPRESSORS_WITHOUT_SILENT_HEAD:
        problem = f"{compact_type!r} compressors have no silent_head; Dispider needs {COMPACT_MODEL_TYPE_V1!r}"
        raise CheckpointError(compact_file, "model_type", problem)
    if compact_type != COMPACT_MODEL_TYPE_V1:
        raise CheckpointError(compact_file, "model_type", f"unknown model_type {compact_type!r}; expected {COMPACT_MODEL_TYPE_V1!r}")
    require_choice(compact, "mm_projector_type", compact_file, PERCEPTION_PROJECTOR_TYPES)
    vision, preprocessor = _read_v1_vision(compact_dir, compact_file, require_key(compact, "mm_vision_tower", compact_file), files)

    # v1 hard-codes the clip_projector input (4 x CLIP width) whatever clip_hidden_size says; absent means that.
    clip_input = int(config.get("clip_hidden_size") or 4 * vision.hidden_size)
    return _LayoutFields(
        format_version=1,
        reaction_config_file=config_file,
        reaction_config=config,
        compress_input=(require_int(config, "compress_hidden_size", config_file), "compress_hidden_size"),
        clip_input=(clip_input, "clip_hidden_size"),
        compact_dir=compact_dir,
        compact_config_file=compact_file,
        compact_config=compact,
        vision=vision,
        preprocessor_config=preprocessor,
        select_layer=int(compact.get("mm_vision_select_layer", DEFAULT_SELECT_LAYER)),
        select_feature=str(compact.get("mm_vision_select_feature", DEFAULT_SELECT_FEATURE)),
        resolution=require_int(compact, "resolution", compact_file),
        pool_num=require_int(compact, "pool_num", compact_file),
        perception_hidden=(require_int(compact, "mm_hidden_size", compact_file), "mm_hidden_size"),
        compact_weights=read_weight_files(compact_dir),
        files=files,
    )


# ---------------------------------------------------------------------------------------------- key mapping

DROP_UNUSED_LM_HEAD = "the compact model's lm_head is unused"
DROP_BUFFER = "a non-persistent buffer saved by older transformers"
DROP_OVERRIDDEN = "overridden by the embedded model.compressor.compressor.* copy"


def reaction_split_name(key: str) -> str:
    """Reaction source key -> split name: the projectors lose their ``model.`` prefix."""
    for projector in ("compress_projector.", "clip_projector."):
        if key.startswith("model." + projector):
            return key[len("model.") :]
    return key


def reaction_source_name(name: str) -> str:
    if name.startswith(("compress_projector.", "clip_projector.")):
        return "model." + name
    return name


def compact_split_name(key: str) -> str | None:
    """Compact-model key (prefix stripped) -> split name; None for the unused lm_head."""
    if key.startswith("model.vision_tower.vision_tower."):
        return "vision_tower." + key[len("model.vision_tower.vision_tower.") :]
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector.") :]
        return "mm_projector." + rest.removeprefix("mlp.")  # both spellings occur: mlp.0.* and 0.*
    if key.startswith("lm_head."):
        return None
    if key.startswith("model."):
        return "language_model." + key[len("model.") :]
    return key  # silent_head.weight, or an unexpected key that validation reports


def compact_source_name(name: str) -> str:
    if name.startswith("vision_tower."):
        return "model.vision_tower." + name
    if name.startswith("mm_projector."):
        return "model.mm_projector.mlp." + name[len("mm_projector.") :]
    if name.startswith("language_model."):
        return "model." + name[len("language_model.") :]
    return name


def _is_buffer(key: str) -> bool:
    return key.endswith(NON_PERSISTENT_BUFFER_SUFFIXES)


def _split_reaction_weights(
    weights: WeightFiles, prefix: str
) -> tuple[dict[str, TensorSource], dict[str, TensorSource], list[DroppedTensor]]:
    """Reaction-dir tensors -> (reaction part by split name, embedded compact tensors by compact key, dropped)."""
    reaction: dict[str, TensorSource] = {}
    embedded: dict[str, TensorSource] = {}
    dropped: list[DroppedTensor] = []
    for key, source in weights.tensors.items():
        if _is_buffer(key):
            dropped.append(DroppedTensor(source, DROP_BUFFER))
        elif key.startswith(prefix):
            embedded[key[len(prefix) :]] = source
        else:
            reaction[reaction_split_name(key)] = source
    return reaction, embedded, dropped


def _map_compact_weights(by_compact_key: dict[str, TensorSource], dropped: list[DroppedTensor]) -> dict[str, TensorSource]:
    mapped: dict[str, TensorSource] = {}
    for key, source in by_compact_key.items():
        name = compact_split_name(key)
        if _is_buffer(key):
            dropped.append(DroppedTensor(source, DROP_BUFFER))
        elif name is None:
            dropped.append(DroppedTensor(source, DROP_UNUSED_LM_HEAD))
        elif name in mapped:
            raise CheckpointError(source.file, source.key, f"a second tensor for {name!r} (also {mapped[name].key!r})")
        else:
            mapped[name] = source
    return mapped


def validated_in_order(
    found: dict[str, TensorSource], expected: ShapeTable, listing: Path, source_name: Callable[[str], str]
) -> dict[str, TensorSource]:
    """Check every found tensor against the expected shapes and every required one for presence.

    Returns the found tensors in the order of the expected table (layer by layer).
    """
    for name, source in found.items():
        want = expected.get(name)
        if want is None:
            raise CheckpointError(source.file, source.key, "unexpected tensor: not part of a Dispider model with this config")
        if source.shape != want.shape:
            problem = f"shape {list(source.shape)} differs from {list(want.shape)}, the shape the configs imply"
            raise CheckpointError(source.file, source.key, problem)
    for name, want in expected.items():
        if want.required and name not in found:
            raise CheckpointError(listing, source_name(name), "missing tensor")
    return {name: found[name] for name in expected if name in found}


# ------------------------------------------------------------------------------------------------- assembly


def open_checkpoint(path: str | Path) -> DispiderCheckpoint:
    """Read and validate a Dispider checkpoint directory (v2 released layout or v1 layout).

    Raises CheckpointError naming the file and key at fault.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(path, None, "not a checkpoint directory")
    path = path.resolve()
    config_file = path / "config.json"
    config = read_json(config_file)
    model_type = config.get("model_type")
    if model_type == REACTION_MODEL_TYPE_V2:
        layout = _read_v2(path, config_file, config)
    elif model_type == REACTION_MODEL_TYPE_V1:
        layout = _read_v1(path, config_file, config)
    else:
        problem = f"unknown model_type {model_type!r}; expected {REACTION_MODEL_TYPE_V2!r} (v2) or {REACTION_MODEL_TYPE_V1!r} (v1)"
        raise CheckpointError(config_file, "model_type", problem)
    return _assemble(path, layout)


def _read_manifest(path: Path, files: list[Path]) -> tuple[Path, str, int]:
    """The v2 manifest: (file, prefix of the embedded compact model, count of embedded keys it verified)."""
    manifest_file = path / MANIFEST_FILE_NAME
    manifest = read_json(manifest_file)
    files.append(manifest_file)
    version = require_int(manifest, "format_version", manifest_file)
    if version != 2:
        raise CheckpointError(manifest_file, "format_version", f"{version}; expected 2")
    embedded = require_key(manifest, "embedded_perception_decision", manifest_file)
    if not isinstance(embedded, dict):
        raise CheckpointError(manifest_file, "embedded_perception_decision", "expected an object")
    prefix = require_key(embedded, "state_dict_prefix", manifest_file)
    return manifest_file, prefix, require_int(embedded, "verified_key_count", manifest_file)


def _assemble(path: Path, layout: _LayoutFields) -> DispiderCheckpoint:
    files = layout.files
    reaction_dims = Qwen2Dims.from_config(layout.reaction_config, layout.reaction_config_file)
    compact_dims = Qwen2Dims.from_config(layout.compact_config, layout.compact_config_file)
    vision = layout.vision

    compress_input, compress_key = layout.compress_input
    if compress_input != compact_dims.hidden_size:
        problem = f"{compress_input}, but the compact LLM is {compact_dims.hidden_size} wide"
        raise CheckpointError(layout.reaction_config_file, compress_key, problem)
    clip_input, clip_key = layout.clip_input
    if clip_input != 4 * vision.hidden_size:
        problem = f"{clip_input}, but the merged CLIP features are {4 * vision.hidden_size} wide"
        raise CheckpointError(layout.reaction_config_file, clip_key, problem)
    perception_hidden = merged_clip_width(*layout.perception_hidden, layout.compact_config_file, vision)
    check_resolution(layout.resolution, layout.compact_config_file, vision)

    # Weights: the reaction dir holds the reaction LLM, its projectors and (embedded) the compact model.
    if layout.format_version == 2:
        manifest_file, prefix, verified_count = _read_manifest(path, files)
    else:
        prefix = EMBEDDED_PREFIX
    weights = read_weight_files(path)
    files += weights.files + (weights.listing,)
    reaction_found, embedded, dropped = _split_reaction_weights(weights, prefix)
    if layout.format_version == 2:
        compact_found = _map_compact_weights(embedded, dropped)
        compact_listing = weights.listing
        compact_source: Callable[[str], str] = lambda name: prefix + compact_source_name(name)  # noqa: E731
    else:
        # v1: the compressor's own weights, overridden one by one by the copy embedded in the reaction
        # shards (compared by split name: the two may spell mm_projector keys differently).
        own = layout.compact_weights
        assert own is not None
        files += own.files + (own.listing,)
        compact_found = _map_compact_weights(own.tensors, dropped)
        for name, source in _map_compact_weights(embedded, dropped).items():
            if name in compact_found:
                dropped.append(DroppedTensor(compact_found[name], DROP_OVERRIDDEN))
            compact_found[name] = source
        compact_listing, compact_source = own.listing, compact_source_name

    reaction_expected = {
        **qwen2_shapes(reaction_dims, "model.", lm_head="lm_head.weight"),
        **mlp2x_gelu_shapes("compress_projector.", compress_input, reaction_dims.hidden_size),
        **mlp2x_gelu_shapes("clip_projector.", clip_input, reaction_dims.hidden_size),
    }
    compact_expected = {
        **qwen2_shapes(compact_dims, "language_model.", lm_head=None),
        **mlp2x_gelu_shapes("mm_projector.", perception_hidden, compact_dims.hidden_size),
        "silent_head.weight": ExpectedTensor((1, compact_dims.hidden_size)),
        **clip_vision_shapes(vision, "vision_tower."),
    }
    reaction_tensors = validated_in_order(reaction_found, reaction_expected, weights.listing, reaction_source_name)
    compact_tensors = validated_in_order(compact_found, compact_expected, compact_listing, compact_source)
    # After the per-tensor checks, which name a missing tensor; this catches what they cannot (an extra lm_head).
    if layout.format_version == 2 and verified_count != len(embedded):
        problem = f"{verified_count}, but the shards hold {len(embedded)} keys under {prefix!r}"
        raise CheckpointError(manifest_file, "verified_key_count", problem)

    reaction_tokens = read_special_token_ids(path)
    compact_tokens = read_special_token_ids(layout.compact_dir, default_pad=COMPACT_PAD_TOKEN)
    check_ids_fit_vocab(reaction_tokens, reaction_dims.vocab_size, path, weights.listing)
    check_ids_fit_vocab(compact_tokens, compact_dims.vocab_size, layout.compact_dir, compact_listing)
    files += tokenizer_files(path) + tokenizer_files(layout.compact_dir)

    extra = {k: layout.reaction_config[k] for k in ("tokenizer_model_max_length",) if k in layout.reaction_config}
    return DispiderCheckpoint(
        path=path,
        format_version=layout.format_version,
        reaction=reaction_dims,
        compress_input_size=compress_input,
        clip_input_size=clip_input,
        compact_dir=layout.compact_dir,
        compact=compact_dims,
        vision=vision,
        preprocessor_config=layout.preprocessor_config,
        select_layer=layout.select_layer,
        select_feature=layout.select_feature,
        resolution=layout.resolution,
        pool_num=layout.pool_num,
        perception_hidden_size=perception_hidden,
        reaction_tokenizer_dir=path,
        compact_tokenizer_dir=layout.compact_dir,
        reaction_tokens=reaction_tokens,
        compact_tokens=compact_tokens,
        reaction_tensors=reaction_tensors,
        perception_decision_tensors=compact_tensors,
        dropped_tensors=tuple(dropped),
        source_files=tuple(dict.fromkeys(files)),
        reaction_extra_config=extra,
    )


__all__ = [
    "CheckpointError",
    "DispiderCheckpoint",
    "DroppedTensor",
    "open_checkpoint",
]
