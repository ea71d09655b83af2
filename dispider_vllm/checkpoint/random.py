"""Tiny random Dispider checkpoints in the real layouts, for tests, the demo and the server's default.

Real transformers modules (Qwen2ForCausalLM, CLIPVisionModel) are built at tiny sizes with a fixed seed and
their state dicts written under the Dispider key names; the tokenizers are byte-level BPEs trained offline
on a built-in text. Sizes (other parts of the project rely on them):

    CLIP vision     image 224, patch 14 (256 patches), hidden 64, intermediate 128, 2 layers, 2 heads
    compact Qwen2   hidden 128, intermediate 256, 2 layers, 2 heads, 1 KV head (head_dim 64)
                    mm_projector Linear(256->128) GELU Linear(128->128); silent_head Linear(128->1, no bias)
    reaction Qwen2  hidden 256, intermediate 512, 2 layers, 4 heads, 2 KV heads (head_dim 64)
                    compress_projector Linear(128->256) GELU Linear(256->256)
                    clip_projector Linear(256->256) GELU Linear(256->256)
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cache import default_split_dir, dispider_home, locked
from .layout import CLIP_PREPROCESSOR_CONFIG, EMBEDDED_PREFIX, MANIFEST_FILE_NAME
from .safetensors_io import INDEX_FILE_NAME, SINGLE_FILE_NAME
from .split import SplitCheckpoint, split_checkpoint
from .tokens import (
    COMPACT_PAD_TOKEN,
    END_OF_TEXT_TOKEN,
    HAS_ANSWER_TOKEN,
    IM_END_TOKEN,
    IM_PATCH_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    KEEP_SILENT_TOKEN,
    TO_DO_TOKEN,
)

if TYPE_CHECKING:
    import torch

# Bump when sizes, keys or tokenizers change: the cached default checkpoint is keyed on it.
GENERATOR_VERSION = 1

VISION_SIZES = dict(
    image_size=224, patch_size=14, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2
)
COMPACT_SIZES = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
)
REACTION_SIZES = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
PERCEPTION_HIDDEN_SIZE = 4 * VISION_SIZES["hidden_size"]  # 2x2-merged CLIP patches
RESOLUTION = 64
POOL_NUM = 4
SELECT_LAYER = -2
BPE_VOCAB_SIZE = 1000
VOCAB_MULTIPLE = 64

# Added after the BPE vocabulary, like Qwen2's own specials. The two orders differ on purpose: code that
# mixes up the reaction and the compact tokenizer gets wrong ids and fails its tests.
REACTION_ADDED_TOKENS = (IM_START_TOKEN, IM_END_TOKEN, IMAGE_TOKEN, IM_PATCH_TOKEN, HAS_ANSWER_TOKEN, TO_DO_TOKEN, KEEP_SILENT_TOKEN)
COMPACT_ADDED_TOKENS = (IM_START_TOKEN, IM_END_TOKEN, COMPACT_PAD_TOKEN, IM_PATCH_TOKEN, IMAGE_TOKEN, TO_DO_TOKEN, HAS_ANSWER_TOKEN, KEEP_SILENT_TOKEN)  # fmt: skip

V1_REACTION_DIR_NAME = "dispider-long-qwen2-reaction"
V1_COMPACT_DIR_NAME = "dispider-stream-qwen2-compressor"

# The training text of the tiny tokenizers: plain English about what the model does, plus digits.
TRAINING_TEXT = """\
A camera records a long video of a kitchen, a street, a park and a small room with a window.
The stream arrives one frame at a time, and the model watches it while it plays.
Every sixteen seconds the frames of the last window become a clip, and the clip is compressed into memory.
This contains a clip sampled in 0 to 16 seconds. This contains a clip sampled in 16 to 32 seconds.
This contains a clip sampled in 32 to 48 seconds, and the next one is sampled in 48 to 64 seconds.
A user asks a question at the start of the video and waits for the answer.
When is the person going to open the door? Tell me when the red car stops at the light.
What is the woman holding in her left hand? How many people are sitting at the table now?
Describe what happens after the dog runs across the grass and jumps into the water.
The decision model reads the question and the memory of every clip, then decides to respond or to stay silent.
If the answer is not in the video yet, the model keeps silent and waits for more clips.
When the event happens, the model retrieves the most relevant clips and writes a short answer.
The answer is: the man opens the door at twenty seconds, then he walks into the house.
The person picks up a cup of coffee, drinks from it, and puts it back on the table.
A chat between a curious user and an artificial intelligence assistant.
The assistant gives helpful, detailed, and polite answers to the user's questions.
USER: what is on the screen? ASSISTANT: a cat sleeps on a sofa next to a green lamp.
USER: is anyone cooking? ASSISTANT: yes, a chef is cutting onions and carrots on a wooden board.
The weather is sunny in the morning, cloudy at noon, and it rains in the evening.
Children play football in the yard while their parents talk near the fence.
She turns on the light, reads a book for a while, and then falls asleep in the chair.
A bird lands on the roof, looks around, and flies away toward the trees.
The train leaves the station at nine, crosses a bridge over the river, and enters a tunnel.
He writes numbers on the board: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 25 30 45 60 90 120.
Time is measured in seconds, minutes and hours; a day has 24 hours and an hour has 3600 seconds.
The quick brown fox jumps over the lazy dog near the old stone wall.
Which object appears first, the blue bottle or the yellow box? Answer with A, B, C or D.
Select the best answer to the following multiple-choice question based on the video.
Respond with only the letter of the correct option. The best answer is: B.
Someone knocks on the door; the host stands up, walks to the hall and greets the guests.
The video ends with a view of the city at night, full of lights, cars and people walking home.
Gardeners water the flowers, trim the bushes and carry heavy bags of soil across the muddy path.
A musician tunes her guitar, clears her throat and begins to sing a quiet song about the ocean.
Scientists measure temperature, pressure and humidity every hour inside the laboratory building.
Vegetables, bread, cheese, apples, oranges and bananas are arranged neatly on the market stall.
The referee whistles, the players celebrate, and thousands of supporters wave colourful flags.
Firefighters climb ladders, spray water on the burning warehouse and rescue two frightened kittens.
A teacher explains fractions, geometry and probability while students take careful notes.
Snow covers the mountains; skiers glide down slopes, and a helicopter circles above the valley.
Passengers board the airplane, fasten seatbelts, and the pilot announces a smooth journey ahead.
Grandmother bakes chocolate cookies, wraps presents and decorates the living room for the holiday.
Mechanics repair engines, replace tyres and check brakes before returning vehicles to customers.
Photographs, paintings and sculptures fill the museum, where visitors whisper and quietly observe.
"""


# ------------------------------------------------------------------------------------------------ tokenizers


def _train_bpe(pre_tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE (vocab and merges) trained on the built-in text; deterministic."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return model["vocab"], [tuple(pair) for pair in model["merges"]]


def build_tokenizer(added_tokens: tuple[str, ...], pad_token: str):
    """A Qwen2 fast tokenizer with ``<|endoftext|>`` as eos (Qwen2 base) and the Dispider tokens added."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    # Qwen2Tokenizer defines Qwen2's normalizer and pre-tokenizer; train the BPE with the very same.
    pre_tokenizer = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer
    vocab, merges = _train_bpe(pre_tokenizer)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)  # adds <|endoftext|>
    tokenizer.add_tokens([AddedToken(text, special=True, normalized=False) for text in added_tokens], special_tokens=True)
    tokenizer.pad_token = pad_token
    return tokenizer


def padded_vocab_size(tokenizer_length: int) -> int:
    return math.ceil(tokenizer_length / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


# ---------------------------------------------------------------------------------------------- configs


def qwen2_config_fields(sizes: dict[str, int], vocab_size: int, eos_id: int) -> dict[str, Any]:
    """Qwen2 config fields the way Qwen2 checkpoints spell them (rope_theta, torch_dtype)."""
    return {
        "vocab_size": vocab_size,
        **sizes,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "use_sliding_window": False,
        "max_window_layers": sizes["num_hidden_layers"],
        "attention_dropout": 0.0,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def vision_config_fields() -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model",
        **VISION_SIZES,
        "num_channels": 3,
        "projection_dim": 64,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------- weights


def _state(module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value.detach().clone().contiguous() for key, value in module.state_dict().items()}


def _clip_vision_model_prefix(clip) -> str:
    """Checkpoints name CLIPVisionModel tensors ``vision_model.*``; transformers 5 modules drop that level
    from their state dict (and add it back when loading), so put it back here."""
    return "" if any(key.startswith("vision_model.") for key in clip.state_dict()) else "vision_model."


def _mlp2x_gelu(in_features: int, out_features: int):
    from torch import nn

    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


def random_compact_state(config_fields: dict[str, Any], mm_projector_prefix: str) -> dict[str, torch.Tensor]:
    """The compact model's keys (model.*, lm_head, silent_head, mm_projector, CLIP), from the torch RNG."""
    from torch import nn
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    clip_fields = {k: v for k, v in vision_config_fields().items() if k not in ("model_type", "torch_dtype")}
    clip = CLIPVisionModel(CLIPVisionConfig(**clip_fields))
    llm = Qwen2ForCausalLM(Qwen2Config(**config_fields))
    hidden = config_fields["hidden_size"]
    return {
        **_state(llm, ""),
        **_state(_mlp2x_gelu(PERCEPTION_HIDDEN_SIZE, hidden), mm_projector_prefix),
        **_state(nn.Linear(hidden, 1, bias=False), "silent_head."),
        **_state(clip, "model.vision_tower.vision_tower." + _clip_vision_model_prefix(clip)),
    }


def random_reaction_state(config_fields: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The reaction LLM and its two projectors, under the Dispider names, from the torch RNG."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    llm = Qwen2ForCausalLM(Qwen2Config(**config_fields))
    hidden = config_fields["hidden_size"]
    return {
        **_state(llm, ""),
        **_state(_mlp2x_gelu(COMPACT_SIZES["hidden_size"], hidden), "model.compress_projector."),
        **_state(_mlp2x_gelu(PERCEPTION_HIDDEN_SIZE, hidden), "model.clip_projector."),
    }


def save_shards(tensors: dict[str, torch.Tensor], out_dir: Path, shard_keys: list[list[str]]) -> None:
    """Save as model-0000k-of-0000n.safetensors + index, one shard per key list."""
    from safetensors.torch import save_file

    weight_map = {}
    for number, keys in enumerate(shard_keys, start=1):
        file_name = f"model-{number:05d}-of-{len(shard_keys):05d}.safetensors"
        save_file({key: tensors[key] for key in keys}, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file_name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(out_dir / INDEX_FILE_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(file: Path, value: dict[str, Any]) -> None:
    file.write_text(json.dumps(value, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _TinyParts:
    reaction_tokenizer: Any
    compact_tokenizer: Any
    reaction_fields: dict[str, Any]
    compact_fields: dict[str, Any]


def _tiny_parts() -> _TinyParts:
    reaction_tokenizer = build_tokenizer(REACTION_ADDED_TOKENS, END_OF_TEXT_TOKEN)
    compact_tokenizer = build_tokenizer(COMPACT_ADDED_TOKENS, COMPACT_PAD_TOKEN)
    eos = reaction_tokenizer.convert_tokens_to_ids(END_OF_TEXT_TOKEN)
    return _TinyParts(
        reaction_tokenizer=reaction_tokenizer,
        compact_tokenizer=compact_tokenizer,
        reaction_fields=qwen2_config_fields(REACTION_SIZES, padded_vocab_size(len(reaction_tokenizer)), eos),
        compact_fields=qwen2_config_fields(COMPACT_SIZES, padded_vocab_size(len(compact_tokenizer)), eos),
    )


def _write_vision_tower(vision_dir: Path) -> None:
    vision_dir.mkdir(parents=True, exist_ok=True)
    _write_json(vision_dir / "config.json", vision_config_fields())
    _write_json(vision_dir / "preprocessor_config.json", CLIP_PREPROCESSOR_CONFIG)


def _write_v2(out_dir: Path, seed: int) -> Path:
    import torch

    parts = _tiny_parts()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        compact = random_compact_state(parts.compact_fields, "model.mm_projector.mlp.")
        reaction = random_reaction_state(parts.reaction_fields)

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {**reaction, **{EMBEDDED_PREFIX + key: value for key, value in compact.items()}}
    save_shards(tensors, out_dir, [list(reaction), [EMBEDDED_PREFIX + key for key in compact]])
    _write_json(
        out_dir / "config.json",
        {
            "architectures": ["DispiderReactionForCausalLM"],
            "model_type": "dispider_reaction",
            **parts.reaction_fields,
            "checkpoint_format_version": 2,
            "perception_decision": "perception_decision",
            "decision_projector_type": "mlp2x_gelu",
            "decision_hidden_size": COMPACT_SIZES["hidden_size"],
            "perception_projector_type": "mlp2x_gelu",
            "perception_hidden_size": PERCEPTION_HIDDEN_SIZE,
        },
    )
    _write_json(
        out_dir / MANIFEST_FILE_NAME,
        {
            "format_version": 2,
            "embedded_perception_decision": {"state_dict_prefix": EMBEDDED_PREFIX, "verified_key_count": len(compact)},
        },
    )
    parts.reaction_tokenizer.save_pretrained(str(out_dir))

    compact_dir = out_dir / "perception_decision"
    compact_dir.mkdir(exist_ok=True)
    _write_json(
        compact_dir / "config.json",
        {
            "architectures": ["DispiderDecisionForCausalLM"],
            "model_type": "dispider_decision",
            **parts.compact_fields,
            "perception_vision_tower": "vision_tower",
            "perception_select_layer": SELECT_LAYER,
            "perception_select_feature": "patch",
            "perception_projector_type": "pool",
            "perception_hidden_size": PERCEPTION_HIDDEN_SIZE,
            "resolution": RESOLUTION,
            "pool_num": POOL_NUM,
        },
    )
    parts.compact_tokenizer.save_pretrained(str(compact_dir))
    _write_vision_tower(compact_dir / "vision_tower")
    return out_dir


def _write_v1(out_dir: Path, seed: int) -> Path:
    """v1: a ``long`` reaction dir whose config names the ``stream_ground_qwen`` compressor dir by absolute path.

    The compressor dir holds its own (stage-1) weights; the reaction shards embed a later copy of all but
    the CLIP tower, which overrides them, as the v1 loader does.
    """
    import torch
    from safetensors.torch import save_file

    parts = _tiny_parts()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        compact = random_compact_state(parts.compact_fields, "model.mm_projector.mlp.")
        reaction = random_reaction_state(parts.reaction_fields)
        torch.manual_seed(seed + 1)
        stage1 = random_compact_state(parts.compact_fields, "model.mm_projector.")  # the other key spelling
    clip_prefix = "model.vision_tower."

    out_dir = out_dir.resolve()
    reaction_dir, compact_dir = out_dir / V1_REACTION_DIR_NAME, out_dir / V1_COMPACT_DIR_NAME
    reaction_dir.mkdir(parents=True, exist_ok=True)
    compact_dir.mkdir(parents=True, exist_ok=True)

    # The CLIP tower is not embedded, so it comes from the compressor dir: give it the same values as v2's,
    # so that v1 and v2 checkpoints of one seed split into identical tensors.
    stage1 = {k: (compact[k] if k.startswith(clip_prefix) else v) for k, v in stage1.items()}
    save_file(stage1, str(compact_dir / SINGLE_FILE_NAME), metadata={"format": "pt"})
    _write_vision_tower(compact_dir / "vision_tower")
    _write_json(
        compact_dir / "config.json",
        {
            "architectures": ["StreamGroundQwenForCausalLM"],
            "model_type": "stream_ground_qwen",
            **parts.compact_fields,
            "mm_vision_tower": str(compact_dir / "vision_tower"),
            "mm_vision_select_layer": SELECT_LAYER,
            "mm_vision_select_feature": "patch",
            "mm_projector_type": "pool",
            "mm_hidden_size": VISION_SIZES["hidden_size"],  # v1 gives the CLIP width; the pool merges 2x2
            "resolution": RESOLUTION,
            "pool_num": POOL_NUM,
            "tokenizer_padding_side": "right",
        },
    )
    parts.compact_tokenizer.save_pretrained(str(compact_dir))

    embedded = {EMBEDDED_PREFIX + k: v for k, v in compact.items() if not k.startswith(clip_prefix)}
    save_file({**reaction, **embedded}, str(reaction_dir / SINGLE_FILE_NAME), metadata={"format": "pt"})
    _write_json(
        reaction_dir / "config.json",
        {
            "architectures": ["LongQwen2ForCausalLM"],
            "model_type": "long",
            **parts.reaction_fields,
            "mm_compressor": str(compact_dir),
            "compress_projector_type": "mlp2x_gelu",
            "compress_hidden_size": COMPACT_SIZES["hidden_size"],
            "clip_projector_type": "mlp2x_gelu",
            "clip_hidden_size": PERCEPTION_HIDDEN_SIZE,
            "use_compress_proj": True,
            "mm_use_im_start_end": False,
            "tokenizer_model_max_length": 32768,
            "tokenizer_padding_side": "right",
        },
    )
    parts.reaction_tokenizer.save_pretrained(str(reaction_dir))
    return reaction_dir


def make_random_checkpoint(out_dir: str | Path, *, seed: int = 0, layout: str = "v2") -> Path:
    """Write a tiny random Dispider checkpoint; returns the directory to open (the reaction dir).

    ``layout="v2"`` writes the released layout into ``out_dir`` itself; ``layout="v1"`` writes
    ``out_dir``/dispider-long-qwen2-reaction and ``out_dir``/dispider-stream-qwen2-compressor.
    """
    out_dir = Path(out_dir).expanduser()
    if layout == "v2":
        return _write_v2(out_dir, seed)
    if layout == "v1":
        return _write_v1(out_dir, seed)
    raise ValueError(f"layout must be 'v1' or 'v2', not {layout!r}")


# ------------------------------------------------------------------------------------------ the default one


@dataclass(frozen=True)
class DefaultCheckpoint:
    """The cached tiny v2 checkpoint and its split."""

    checkpoint_dir: Path
    split: SplitCheckpoint

    @property
    def reaction_dir(self) -> Path:
        return self.split.reaction_dir

    @property
    def perception_decision_dir(self) -> Path:
        return self.split.perception_decision_dir


def default_checkpoint_dir() -> Path:
    """Where the default tiny random checkpoint lives (under ``$DISPIDER_HOME``, else ~/.cache/dispider-vllm)."""
    return dispider_home() / f"random-tiny-v2-seed0-g{GENERATOR_VERSION}"


def ensure_default_checkpoint() -> DefaultCheckpoint:
    """Make the default tiny checkpoint and its split if they are not cached yet; safe across processes."""
    checkpoint_dir = default_checkpoint_dir()
    with locked(dispider_home() / ".default-checkpoint.lock"):
        if not checkpoint_dir.is_dir():
            # Built aside and renamed into place, so a half-written checkpoint is never seen as done.
            partial = checkpoint_dir.with_name(checkpoint_dir.name + ".partial")
            if partial.exists():
                shutil.rmtree(partial)
            make_random_checkpoint(partial, seed=0, layout="v2")
            partial.rename(checkpoint_dir)
    split = split_checkpoint(checkpoint_dir, default_split_dir(checkpoint_dir))
    return DefaultCheckpoint(checkpoint_dir, split)
