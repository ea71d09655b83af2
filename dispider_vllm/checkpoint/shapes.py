"""The tensor shapes a config implies, for the Qwen2 LLMs, the CLIP tower and the projectors.

Every expected-shape table is keyed by the *split* tensor name (the names written by ``split.py``), so one
table serves the v1 and the v2 layouts. Each entry also says whether the tensor must be present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError


@dataclass(frozen=True)
class ExpectedTensor:
    shape: tuple[int, ...]
    required: bool = True


ShapeTable = dict[str, ExpectedTensor]

# Qwen2 config keys carried over to the split configs; everything else in a Dispider config is Dispider's own.
QWEN2_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "layer_types",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "torch_dtype",
    "dtype",
)

CLIP_VISION_CONFIG_KEYS = (
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "initializer_range",
    "initializer_factor",
    "torch_dtype",
    "dtype",
)


def require_key(config: dict[str, Any], key: str, file: Path) -> Any:
    if key not in config or config[key] is None:
        raise CheckpointError(file, key, "missing required config key")
    return config[key]


def require_int(config: dict[str, Any], key: str, file: Path) -> int:
    value = require_key(config, key, file)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(file, key, f"expected an integer, found {value!r}")
    return value


def require_choice(config: dict[str, Any], key: str, file: Path, allowed: tuple[str, ...]) -> str:
    value = require_key(config, key, file)
    if value not in allowed:
        raise CheckpointError(file, key, f"unsupported value {value!r}; supported: {', '.join(allowed)}")
    return value


@dataclass(frozen=True)
class Qwen2Dims:
    """The sizes of one Qwen2 LLM, plus the Qwen2 fields of its config as read (``fields``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    fields: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, config: dict[str, Any], file: Path) -> Qwen2Dims:
        hidden = require_int(config, "hidden_size", file)
        heads = require_int(config, "num_attention_heads", file)
        # Qwen2Config defaults: as many KV heads as query heads, head_dim = hidden / heads, untied lm_head.
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        return cls(
            vocab_size=require_int(config, "vocab_size", file),
            hidden_size=hidden,
            intermediate_size=require_int(config, "intermediate_size", file),
            num_hidden_layers=require_int(config, "num_hidden_layers", file),
            num_attention_heads=heads,
            num_key_value_heads=int(kv_heads),
            head_dim=int(head_dim),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            fields={k: config[k] for k in QWEN2_CONFIG_KEYS if k in config},
        )

    def to_hf_config(self):
        """A transformers ``Qwen2Config`` with these fields (imports transformers)."""
        from transformers import Qwen2Config

        return Qwen2Config(**self.fields)


@dataclass(frozen=True)
class VisionDims:
    """The sizes of the CLIP vision tower, plus its CLIPVisionConfig fields (``fields``)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    fields: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side**2

    @classmethod
    def from_config(cls, config: dict[str, Any], file: Path) -> VisionDims:
        # A full CLIPConfig nests the tower's config; a CLIPVisionConfig is flat.
        if config.get("model_type") == "clip":
            config = require_key(config, "vision_config", file)
        dims = cls(
            hidden_size=require_int(config, "hidden_size", file),
            intermediate_size=require_int(config, "intermediate_size", file),
            num_hidden_layers=require_int(config, "num_hidden_layers", file),
            num_attention_heads=require_int(config, "num_attention_heads", file),
            image_size=require_int(config, "image_size", file),
            patch_size=require_int(config, "patch_size", file),
            num_channels=int(config.get("num_channels", 3)),
            fields={
                "model_type": "clip_vision_model",
                **{k: config[k] for k in CLIP_VISION_CONFIG_KEYS if k in config},
            },
        )
        if dims.image_size % dims.patch_size:
            raise CheckpointError(file, "image_size", f"{dims.image_size} is not a multiple of patch_size")
        return dims

    def to_hf_config(self):
        """A transformers ``CLIPVisionConfig`` with these fields (imports transformers)."""
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(**{k: v for k, v in self.fields.items() if k != "model_type"})


def qwen2_shapes(dims: Qwen2Dims, prefix: str, *, lm_head: str | None) -> ShapeTable:
    """A Qwen2 decoder under ``prefix`` (``model.`` or ``language_model.``); ``lm_head`` names its head, if kept."""
    h, q, kv = dims.hidden_size, dims.num_attention_heads * dims.head_dim, dims.num_key_value_heads * dims.head_dim
    table: ShapeTable = {f"{prefix}embed_tokens.weight": ExpectedTensor((dims.vocab_size, h))}
    for i in range(dims.num_hidden_layers):
        layer = f"{prefix}layers.{i}."
        table.update(
            {
                layer + "self_attn.q_proj.weight": ExpectedTensor((q, h)),
                layer + "self_attn.q_proj.bias": ExpectedTensor((q,)),
                layer + "self_attn.k_proj.weight": ExpectedTensor((kv, h)),
                layer + "self_attn.k_proj.bias": ExpectedTensor((kv,)),
                layer + "self_attn.v_proj.weight": ExpectedTensor((kv, h)),
                layer + "self_attn.v_proj.bias": ExpectedTensor((kv,)),
                layer + "self_attn.o_proj.weight": ExpectedTensor((h, q)),
                layer + "mlp.gate_proj.weight": ExpectedTensor((dims.intermediate_size, h)),
                layer + "mlp.up_proj.weight": ExpectedTensor((dims.intermediate_size, h)),
                layer + "mlp.down_proj.weight": ExpectedTensor((h, dims.intermediate_size)),
                layer + "input_layernorm.weight": ExpectedTensor((h,)),
                layer + "post_attention_layernorm.weight": ExpectedTensor((h,)),
            }
        )
    table[f"{prefix}norm.weight"] = ExpectedTensor((h,))
    if lm_head is not None:
        # A tied head may be left out of the checkpoint; an untied one may not.
        table[lm_head] = ExpectedTensor((dims.vocab_size, h), required=not dims.tie_word_embeddings)
    return table


def clip_vision_shapes(dims: VisionDims, prefix: str) -> ShapeTable:
    """The transformers CLIPVisionModel state dict under ``prefix`` (e.g. ``vision_tower.``)."""
    h, i, p = dims.hidden_size, dims.intermediate_size, dims.patch_size
    base = prefix + "vision_model."
    table: ShapeTable = {
        base + "embeddings.class_embedding": ExpectedTensor((h,)),
        base + "embeddings.patch_embedding.weight": ExpectedTensor((h, dims.num_channels, p, p)),
        base + "embeddings.position_embedding.weight": ExpectedTensor((dims.num_patches + 1, h)),
        base + "pre_layrnorm.weight": ExpectedTensor((h,)),
        base + "pre_layrnorm.bias": ExpectedTensor((h,)),
    }
    for n in range(dims.num_hidden_layers):
        layer = f"{base}encoder.layers.{n}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            table[f"{layer}self_attn.{proj}.weight"] = ExpectedTensor((h, h))
            table[f"{layer}self_attn.{proj}.bias"] = ExpectedTensor((h,))
        for norm in ("layer_norm1", "layer_norm2"):
            table[f"{layer}{norm}.weight"] = ExpectedTensor((h,))
            table[f"{layer}{norm}.bias"] = ExpectedTensor((h,))
        table[layer + "mlp.fc1.weight"] = ExpectedTensor((i, h))
        table[layer + "mlp.fc1.bias"] = ExpectedTensor((i,))
        table[layer + "mlp.fc2.weight"] = ExpectedTensor((h, i))
        table[layer + "mlp.fc2.bias"] = ExpectedTensor((h,))
    # The features are taken before the last layer norm (select layer -2, "patch"), so it is optional.
    table[base + "post_layernorm.weight"] = ExpectedTensor((h,), required=False)
    table[base + "post_layernorm.bias"] = ExpectedTensor((h,), required=False)
    return table


def mlp2x_gelu_shapes(prefix: str, in_features: int, out_features: int) -> ShapeTable:
    """Linear(in -> out), GELU, Linear(out -> out): Sequential indices 0 and 2."""
    return {
        prefix + "0.weight": ExpectedTensor((out_features, in_features)),
        prefix + "0.bias": ExpectedTensor((out_features,)),
        prefix + "2.weight": ExpectedTensor((out_features, out_features)),
        prefix + "2.bias": ExpectedTensor((out_features,)),
    }
