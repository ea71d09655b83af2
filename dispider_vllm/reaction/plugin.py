"""vLLM general-plugin entry point (``[project.entry-points."vllm.general_plugins"]``)."""

from dispider_vllm.reaction import ARCHITECTURE


def register() -> None:
    """Register the reaction model with vLLM's model registry (lazily: no torch/CUDA work at import)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "dispider_vllm.reaction.model:DispiderReactionForCausalLM")
