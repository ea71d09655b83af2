"""DispiderReactionForCausalLM: vLLM's own Qwen2 decoder plus Dispider's two projectors.

The decoder is vLLM's ``Qwen2ForCausalLM`` (paged attention, tensor-parallel linear layers, CUDA graphs),
so generation runs exactly as plain Qwen2 does. What is added is the multimodal input (DISPIDER.md section 4):

    for each retrieved clip j (time order):  clip_projector(raw_j)      1024 positions
                                             compress_projector(M_j)    64 positions
    then:                                    compress_projector(G)      t positions

placed at the prompt's image placeholder. Both projectors are Linear, GELU, Linear ("mlp2x_gelu").
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from dispider_vllm.reaction.processor import (
    BUNDLE_FIELDS,
    DispiderDummyInputsBuilder,
    DispiderMultiModalProcessor,
    DispiderProcessingInfo,
)


class MlpProjector(nn.Module):
    """Linear(in -> hidden), GELU, Linear(hidden -> hidden); checkpoint keys ``.0.`` and ``.2.``."""

    def __init__(self, in_features: int, hidden: int, *, quant_config=None, prefix: str = "") -> None:
        super().__init__()
        # Column then row parallel: the GELU runs on each rank's shard, one all-reduce at the end.
        self.fc1 = ColumnParallelLinear(in_features, hidden, bias=True, quant_config=quant_config, prefix=f"{prefix}.fc1")
        self.act = nn.GELU()
        self.fc2 = RowParallelLinear(hidden, hidden, bias=True, quant_config=quant_config, prefix=f"{prefix}.fc2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.fc1(x)
        x, _ = self.fc2(self.act(x))
        return x


def _as_list(value) -> list[torch.Tensor]:
    """vLLM stacks same-shaped items into one tensor and leaves ragged ones as a list."""
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    return list(value)


@MULTIMODAL_REGISTRY.register_processor(
    DispiderMultiModalProcessor,
    info=DispiderProcessingInfo,
    dummy_inputs=DispiderDummyInputsBuilder,
)
class DispiderReactionForCausalLM(nn.Module, SupportsMultiModal, SupportsPP):
    # Checkpoint names (split reaction part, or the original ``model.*_projector`` names) -> module names.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.compress_projector.": "compress_projector.",
            "model.clip_projector.": "clip_projector.",
            "model.compressor.": None,  # the perception/decision part belongs to the sidecar
            "model.": "language_model.model.",
            "lm_head.": "language_model.lm_head.",
        },
        orig_to_new_substr={"_projector.0.": "_projector.fc1.", "_projector.2.": "_projector.fc2."},
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality == "image":
            return "<image>"
        raise ValueError(f"the Dispider reaction model takes only clip bundles ('image'), not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        self.config = config
        # The projectors' input dtype: under --quantization fp8 their weights are FP8, their inputs stay this.
        self._input_dtype = vllm_config.model_config.dtype
        with self._mark_tower_model(vllm_config, "image"):
            self.clip_projector = MlpProjector(
                config.clip_hidden_size, config.hidden_size,
                quant_config=quant_config, prefix=maybe_prefix(prefix, "clip_projector"),
            )
            self.compress_projector = MlpProjector(
                config.compress_hidden_size, config.hidden_size,
                quant_config=quant_config, prefix=maybe_prefix(prefix, "compress_projector"),
            )
        with self._mark_language_model(vllm_config):
            self.language_model = Qwen2ForCausalLM(
                vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model")
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors


    def embed_bundle(self, raw: torch.Tensor, memory: torch.Tensor, global_memory: torch.Tensor) -> torch.Tensor:
        """[k,1024,Dr], [k,64,Dm], [t,Dm] -> [1088k + t, hidden] in splice order."""
        dtype = self._input_dtype
        per_clip = torch.cat(
            [self.clip_projector(raw.to(dtype)), self.compress_projector(memory.to(dtype))], dim=1
        )  # [k, 1088, hidden]: raw then memory, clip by clip
        global_embeds = self.compress_projector(global_memory.to(dtype))
        return torch.cat([per_clip.flatten(0, 1), global_embeds], dim=0)

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        if kwargs.get("clip_raw") is None:
            return []
        raws, memories, globals_ = (_as_list(kwargs[name]) for name in BUNDLE_FIELDS)
        return [self.embed_bundle(r, m, g) for r, m, g in zip(raws, memories, globals_)]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        skip = ["language_model.lm_head."] if self.config.tie_word_embeddings else None
        return AutoWeightsLoader(self, skip_prefixes=skip).load_weights(weights, mapper=self.hf_to_vllm_mapper)
