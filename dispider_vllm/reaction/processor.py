"""vLLM multimodal processing for the reaction model: one clip-feature bundle per request.

A request carries ``multi_modal_data={"image": {"clip_raw": [k,1024,Dr], "clip_memory": [k,64,Dm],
"global_memory": [t,Dm]}}`` and a prompt with one image placeholder token. The processor checks the
bundle (a bad one fails that request only, with a message naming the field), and expands the placeholder to
the 1088*k + t positions that the model's projected features fill.

The bundle is processor data, not a precomputed embedding: vLLM hashes it, so requests that share a bundle
share prefix-cache blocks, and ``--enable-mm-embeds`` is not needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import BatchFeature

from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ModalityDataItems, MultiModalDataItems, MultiModalDataParser
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
)

from dispider_vllm.types import MEMORY_TOKENS_PER_CLIP, RAW_TOKENS_PER_CLIP, REACTION_TOKENS_PER_CLIP

BUNDLE_FIELDS = ("clip_raw", "clip_memory", "global_memory")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_MAX_BUNDLE_CLIPS = 4  # top-k of streaming retrieval (DISPIDER.md section 4)
DEFAULT_MAX_GLOBAL_CLIPS = 256  # about an hour of 16-s clips


class BundleError(ValueError):
    """A clip-feature bundle of the wrong structure, shape or dtype."""


def bundle_limits(hf_config) -> tuple[int, int]:
    """(max retrieved clips k, max global-memory clips t) accepted per request."""
    max_clips = int(getattr(hf_config, "dispider_max_bundle_clips", DEFAULT_MAX_BUNDLE_CLIPS))
    max_global = int(getattr(hf_config, "dispider_max_global_clips", DEFAULT_MAX_GLOBAL_CLIPS))
    return max_clips, max_global


def bundle_positions(num_clips: int, num_global: int) -> int:
    return REACTION_TOKENS_PER_CLIP * num_clips + num_global


def validate_bundle(item: Any, *, raw_dim: int, memory_dim: int, max_clips: int, max_global: int) -> dict:
    """Check one bundle; return it as a dict of tensors. Raises BundleError naming what is wrong."""
    if not isinstance(item, Mapping):
        raise BundleError(
            f"a clip bundle must be a dict with the fields {list(BUNDLE_FIELDS)}, got {type(item).__name__}"
        )
    unknown = set(item) - set(BUNDLE_FIELDS)
    missing = [name for name in BUNDLE_FIELDS if name not in item]
    if unknown or missing:
        raise BundleError(f"clip bundle fields: missing {missing}, unknown {sorted(unknown)}")
    for name in BUNDLE_FIELDS:
        value = item[name]
        if not isinstance(value, torch.Tensor):
            raise BundleError(f"clip bundle field {name!r} must be a torch.Tensor, got {type(value).__name__}")
        if value.dtype not in FLOAT_DTYPES:
            raise BundleError(f"clip bundle field {name!r} has dtype {value.dtype}; expected float32/16 or bfloat16")
    raw, memory, global_memory = (item[name] for name in BUNDLE_FIELDS)
    _check_shape("clip_raw", raw, (None, RAW_TOKENS_PER_CLIP, raw_dim))
    _check_shape("clip_memory", memory, (None, MEMORY_TOKENS_PER_CLIP, memory_dim))
    _check_shape("global_memory", global_memory, (None, memory_dim))
    k, t = raw.shape[0], global_memory.shape[0]
    if memory.shape[0] != k:
        raise BundleError(f"clip_raw has {k} clips but clip_memory has {memory.shape[0]}")
    if not 1 <= k <= max_clips:
        raise BundleError(f"a bundle holds 1 to {max_clips} retrieved clips, got {k}")
    if not 1 <= t <= max_global:
        raise BundleError(f"global_memory holds 1 to {max_global} clips, got {t}")
    # No scan for NaN/inf here: it costs ~100 ms of host time per 4-clip bundle, on every request's path to
    # its first token, and a non-finite bundle only spoils its own request's answer.
    return {name: item[name] for name in BUNDLE_FIELDS}


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int | None, ...]) -> None:
    ok = tensor.ndim == len(expected) and all(e is None or e == s for e, s in zip(expected, tensor.shape))
    if not ok:
        want = "[" + ", ".join("n" if e is None else str(e) for e in expected) + "]"
        raise BundleError(f"clip bundle field {name!r} has shape {list(tensor.shape)}; expected {want}")


class ClipBundleItems(ModalityDataItems[list, dict]):
    """The ``image`` items of a request: validated clip bundles, handed to the processor as they are."""

    def __init__(self, bundles: list[dict]) -> None:
        super().__init__(bundles, "image")

    def get_count(self) -> int:
        return len(self.data)

    def get(self, index: int) -> dict:
        return self.data[index]

    def get_processor_data(self) -> Mapping[str, object]:
        return {name: [bundle[name] for bundle in self.data] for name in BUNDLE_FIELDS}

    def get_passthrough_data(self) -> Mapping[str, object]:
        return {}


class ClipBundleParser(MultiModalDataParser):
    def __init__(self, *, validate_item, **kwargs) -> None:
        super().__init__(**kwargs)
        self._validate_item = validate_item

    def _parse_image_data(self, data):
        if data is None:
            return None
        items = data if isinstance(data, (list, tuple)) else [data]
        return ClipBundleItems([self._validate_item(item) for item in items])


class DispiderProcessingInfo(BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": 1}

    def dims(self) -> tuple[int, int]:
        config = self.get_hf_config()
        return int(config.clip_hidden_size), int(config.compress_hidden_size)

    def image_token_id(self) -> int:
        return int(self.get_hf_config().image_token_id)

    def max_positions_per_bundle(self) -> int:
        return bundle_positions(*bundle_limits(self.get_hf_config()))

    def get_mm_max_tokens_per_item(self, seq_len: int, mm_counts: Mapping[str, int]) -> Mapping[str, int]:
        return {"image": min(seq_len, self.max_positions_per_bundle())}

    def validate_item(self, item: Any) -> dict:
        raw_dim, memory_dim = self.dims()
        max_clips, max_global = bundle_limits(self.get_hf_config())
        return validate_bundle(item, raw_dim=raw_dim, memory_dim=memory_dim, max_clips=max_clips, max_global=max_global)

    def get_data_parser(self) -> MultiModalDataParser:
        return ClipBundleParser(validate_item=self.validate_item)


class DispiderDummyInputsBuilder(BaseDummyInputsBuilder[DispiderProcessingInfo]):
    """The largest bundle the engine accepts, for vLLM's memory profiling."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        token = self.info.get_tokenizer().convert_ids_to_tokens(self.info.image_token_id())
        return token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options=None):
        if mm_counts.get("image", 0) == 0:
            return {}
        raw_dim, memory_dim = self.info.dims()
        max_clips, max_global = bundle_limits(self.info.get_hf_config())
        k, t = _largest_bundle_within(seq_len, max_clips, max_global)
        return {
            "image": {
                "clip_raw": torch.zeros(k, RAW_TOKENS_PER_CLIP, raw_dim),
                "clip_memory": torch.zeros(k, MEMORY_TOKENS_PER_CLIP, memory_dim),
                "global_memory": torch.zeros(t, memory_dim),
            }
        }


def _largest_bundle_within(seq_len: int, max_clips: int, max_global: int) -> tuple[int, int]:
    k = max(1, min(max_clips, (seq_len - 1) // REACTION_TOKENS_PER_CLIP))
    t = max(1, min(max_global, seq_len - REACTION_TOKENS_PER_CLIP * k))
    return k, t


class DispiderMultiModalProcessor(BaseMultiModalProcessor[DispiderProcessingInfo]):
    def _call_hf_processor(
        self,
        prompt: str,
        mm_data: Mapping[str, object],
        mm_kwargs: Mapping[str, object],
        tok_kwargs: Mapping[str, object],
    ) -> BatchFeature:
        # There is no Hugging Face processor: tokenize the text, keep the bundle tensors as they are.
        prompt_ids = self.info.get_tokenizer().encode(prompt, add_special_tokens=False)
        features = BatchFeature({"input_ids": [prompt_ids]})
        for name in BUNDLE_FIELDS:
            if name in mm_data:
                features[name] = list(mm_data[name])
        return features

    def _hf_processor_applies_updates(self, *args, **kwargs) -> bool:
        return False

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {name: MultiModalFieldConfig.batched("image") for name in BUNDLE_FIELDS}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.image_token_id()
        out_data = out_mm_kwargs.get_data()

        def bundle_placeholders(item_idx: int) -> PromptUpdateDetails:
            num_clips = out_data["clip_raw"][item_idx].shape[0]
            num_global = out_data["global_memory"][item_idx].shape[0]
            tokens = [image_token_id] * bundle_positions(num_clips, num_global)
            return PromptUpdateDetails.select_token_id(tokens, embed_token_id=image_token_id)

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=bundle_placeholders)]
