"""The reaction room: the Dispider reaction LLM (Qwen2 + two projectors) as a vLLM model.

``plugin.register`` is vLLM's ``vllm.general_plugins`` entry point: every vLLM process (the engine core,
spawned workers, ``vllm serve``) calls it and so finds ``DispiderReactionForCausalLM``.
"""

ARCHITECTURE = "DispiderReactionForCausalLM"
