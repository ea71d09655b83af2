"""Reading, validating, splitting and generating Dispider checkpoints.

    open_checkpoint(path)            -> DispiderCheckpoint   v1 or v2 layout, validated, one typed view
    split_checkpoint(src, out_dir)   -> SplitCheckpoint      vLLM reaction dir + perception/decision dir
    open_perception_decision(dir)    -> PerceptionDecisionPart
    make_random_checkpoint(out_dir)  -> Path                 tiny random checkpoint, real layout
    ensure_default_checkpoint()      -> DefaultCheckpoint    the cached tiny checkpoint and its split

Command line: ``dispider-checkpoint`` or ``python -m dispider_vllm.checkpoint``.
"""

from .cache import default_split_dir, dispider_home
from .errors import CheckpointError
from .layout import DispiderCheckpoint, DroppedTensor, open_checkpoint
from .random import DefaultCheckpoint, default_checkpoint_dir, ensure_default_checkpoint, make_random_checkpoint
from .safetensors_io import TensorSource
from .shapes import Qwen2Dims, VisionDims
from .split import PerceptionDecisionPart, SplitCheckpoint, open_perception_decision, split_checkpoint
from .tokens import SpecialTokenIds

__all__ = [
    "CheckpointError",
    "DefaultCheckpoint",
    "DispiderCheckpoint",
    "DroppedTensor",
    "PerceptionDecisionPart",
    "Qwen2Dims",
    "SpecialTokenIds",
    "SplitCheckpoint",
    "TensorSource",
    "VisionDims",
    "default_checkpoint_dir",
    "default_split_dir",
    "dispider_home",
    "ensure_default_checkpoint",
    "make_random_checkpoint",
    "open_checkpoint",
    "open_perception_decision",
    "split_checkpoint",
]
