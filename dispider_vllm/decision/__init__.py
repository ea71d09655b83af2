"""Decision: per-clip trigger logits for many streams, and the clip bundle a trigger hands to the reaction.

    compact_lm  the compact Qwen2 on input embeddings, with a KV pool shared by all streams
    context     one stream's decision sequence and how it sits in the KV cache
    engine      DecisionEngine: open/ask/close streams, step() over new clip features, batched
"""

from .compact_lm import CompactLM, KVPool
from .context import DecisionContext
from .engine import DecisionConfig, DecisionEngine, ForceRespond, KeptClipsUsage

__all__ = ["CompactLM", "DecisionConfig", "DecisionContext", "DecisionEngine", "ForceRespond", "KVPool",
           "KeptClipsUsage"]
