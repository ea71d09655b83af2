"""dispider-vllm: serve Dispider (a proactive streaming video LLM) on vLLM.

Data flows one way through the rooms of this package:

    perception/  frames -> clips -> clip features (raw, memory M, indicator T)
    decision/    clip features + question -> decision events, triggers with a clip bundle
    sidecar/     the process that runs perception and decision for every live stream, batched
    reaction/    the vLLM model that answers a trigger from its clip bundle
    checkpoint/  reading, splitting and generating Dispider checkpoints

The typed hand-offs between rooms live in :mod:`dispider_vllm.types`.
"""

__version__ = "0.1.0"
