"""The networks of Dispider's compact model: CLIP tower, pool projector, compact Qwen2 and silent head.

On-disk door (the ``perception_decision`` part directory, DISPIDER.md section 5):

    config.json                       compact Qwen2 fields + perception_select_layer, perception_select_feature,
                                      resolution, pool_num, perception_hidden_size (= 4 * CLIP hidden)
    vision_tower/config.json          a transformers CLIPVisionConfig (a full CLIPConfig is accepted too)
    vision_tower/preprocessor_config.json
    tokenizer files                   the compact tokenizer (single-id <has_answer>, <to_do>, <image>, <pad>)
    model.safetensors                 language_model.*           (a Qwen2Model state dict)
                                      mm_projector.{0,2}.{weight,bias}
                                      silent_head.weight          [1, H], no bias
                                      vision_tower.vision_model.* (CLIPVisionModel keys, transformers-4 naming)

Loading is strict: a missing or unexpected key is an error that names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2Model
from transformers.initialization import no_init_weights

WEIGHTS_FILE = "model.safetensors"
VISION_DIR = "vision_tower"

LANGUAGE_PREFIX = "language_model."
PROJECTOR_PREFIX = "mm_projector."
HEAD_PREFIX = "silent_head."
VISION_PREFIX = "vision_tower.vision_model."

# The compact lm_head is never used (DISPIDER.md section 8.13); tolerate it if a split leaves it in.
UNUSED_KEYS = frozenset({"lm_head.weight", "language_model.lm_head.weight"})

PERCEPTION_CONFIG_KEYS = (
    "perception_select_layer",
    "perception_select_feature",
    "perception_projector_type",
    "perception_hidden_size",
    "perception_vision_tower",
    "resolution",
    "pool_num",
)

SPECIAL_TOKENS = ("<|endoftext|>", "<pad>", "<image>", "<has_answer>", "<to_do>", "<keep_silent>", "<im_patch>")

# Shapes of the random models. The tiny ones are what tests and the tiny random checkpoint use.
TINY_CLIP = dict(image_size=224, patch_size=14, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu")
TINY_QWEN = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768)
REAL_CLIP = dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                 num_hidden_layers=24, num_attention_heads=16, hidden_act="quick_gelu", projection_dim=768)
REAL_QWEN = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                 vocab_size=151936)
# Random tiny weights need peaky attention, otherwise a wrong position or mask would hardly move the outputs.
TINY_INIT_STD = 0.1

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class PerceptionDecisionModules:
    """Every network of the perception/decision side, in eval mode on one device and dtype."""

    vision_tower: CLIPVisionModel
    language_model: Qwen2Model
    mm_projector: nn.Sequential  # Linear(4C -> H), GELU, Linear(H -> H)
    silent_head: nn.Linear  # Linear(H -> 1, bias=False); logit > 0 means respond
    tokenizer: Any
    select_layer: int = -2
    select_feature: str = "patch"
    resolution: int = 64  # merged tokens per frame (8x8)
    pool_num: int = 4  # pooled cells per frame (2x2)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32

    # ---- shapes -------------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.language_model.config.hidden_size)

    @property
    def clip_hidden_size(self) -> int:
        return int(self.vision_tower.config.hidden_size)

    @property
    def raw_dim(self) -> int:
        return self.clip_hidden_size * self.merge_factor**2

    @property
    def patch_grid(self) -> int:
        cfg = self.vision_tower.config
        return cfg.image_size // cfg.patch_size

    @property
    def merge_factor(self) -> int:
        """Patches merged per side: 16x16 patches -> 8x8 merged tokens is a factor of 2."""
        side = _int_sqrt(self.resolution)
        if self.patch_grid % side:
            raise ValueError(f"resolution {self.resolution} does not divide a {self.patch_grid}^2 patch grid")
        return self.patch_grid // side

    def token_ids(self, text: str) -> list[int]:
        """Compact-tokenizer ids, no BOS/EOS (Qwen adds none)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- building -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, part_dir: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> PerceptionDecisionModules:
        """Read a perception_decision part directory (strict key check)."""
        part_dir = Path(part_dir)
        config = json.loads((part_dir / "config.json").read_text())
        qwen_config = _qwen_config_from(config)
        clip_config = _clip_config_from(json.loads((part_dir / VISION_DIR / "config.json").read_text()))
        tokenizer = AutoTokenizer.from_pretrained(part_dir, config=qwen_config)
        if config.get("dispider_dummy_weights"):  # a shapes-only split for benchmarks: random weights, on device
            return cls._build(qwen_config, clip_config, config, tokenizer, device=torch.device(device))._finish(dtype)
        with no_init_weights():  # the weights come from disk; skip the slow random init
            modules = cls._build(qwen_config, clip_config, config, tokenizer, device=torch.device(device))
        modules._load_state_dict(load_file(part_dir / WEIGHTS_FILE, device=str(device)))
        return modules._finish(dtype)

    @classmethod
    def random(cls, seed: int = 0, *, real_shapes: bool = False, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, tokenizer: Any = None, select_layer: int = -2,
               init_std: float | None = None) -> PerceptionDecisionModules:
        """Random weights with the tiny test shapes, or the real CLIP-L/14 + Qwen2-1.5B shapes.

        Weights are initialised on ``device`` directly, so real shapes on a GPU take a second or two.
        """
        tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
        clip_kwargs, qwen_kwargs = (REAL_CLIP, REAL_QWEN) if real_shapes else (TINY_CLIP, TINY_QWEN)
        std = init_std if init_std is not None else (0.02 if real_shapes else TINY_INIT_STD)
        vocab = qwen_kwargs.get("vocab_size", _round_up(len(tokenizer), 64))
        qwen_config = Qwen2Config(**{**qwen_kwargs, "vocab_size": vocab, "initializer_range": std,
                                     "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False})
        clip_config = CLIPVisionConfig(**clip_kwargs)
        perception = {"perception_select_layer": select_layer, "perception_select_feature": "patch",
                      "resolution": 64, "pool_num": 4}
        torch.manual_seed(seed)
        device = torch.device(device)
        modules = cls._build(qwen_config, clip_config, perception, tokenizer, device=device)
        for linear in (modules.mm_projector[0], modules.mm_projector[2], modules.silent_head):
            nn.init.normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        return modules._finish(dtype)

    @classmethod
    def _build(cls, qwen_config: Qwen2Config, clip_config: CLIPVisionConfig, perception: dict[str, Any],
               tokenizer: Any, device: torch.device) -> PerceptionDecisionModules:
        qwen_config._attn_implementation = "sdpa"
        clip_config._attn_implementation = "sdpa"
        hidden = qwen_config.hidden_size
        with torch.device(device):
            vision_tower = CLIPVisionModel(clip_config)
            language_model = Qwen2Model(qwen_config)
            raw_dim = int(perception.get("perception_hidden_size", 4 * clip_config.hidden_size))
            mm_projector = nn.Sequential(nn.Linear(raw_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
            silent_head = nn.Linear(hidden, 1, bias=False)
        modules = cls(
            vision_tower=vision_tower, language_model=language_model, mm_projector=mm_projector,
            silent_head=silent_head, tokenizer=tokenizer,
            select_layer=int(perception.get("perception_select_layer", -2)),
            select_feature=str(perception.get("perception_select_feature", "patch")),
            resolution=int(perception.get("resolution", 64)), pool_num=int(perception.get("pool_num", 4)),
            device=device,
        )
        if modules.raw_dim != raw_dim:
            raise ValueError(f"perception_hidden_size {raw_dim} != {modules.merge_factor}^2 x CLIP hidden "
                             f"{modules.clip_hidden_size}")
        if modules.select_feature != "patch":
            raise ValueError(f"only the 'patch' feature select is supported, not {modules.select_feature!r}")
        return modules

    def _finish(self, dtype: torch.dtype) -> PerceptionDecisionModules:
        # RoPE frequencies must stay fp32: a bf16-rounded inv_freq puts position 2000 radians off.
        rope_buffers = {(sub, name): buf.clone() for sub in self.language_model.modules()
                        for name, buf in sub.named_buffers(recurse=False) if "inv_freq" in name}
        for module in self._named_modules().values():
            module.to(dtype=dtype).eval().requires_grad_(False)
        for (sub, name), buf in rope_buffers.items():
            setattr(sub, name, buf)
        self.dtype = dtype
        return self

    def _named_modules(self) -> dict[str, nn.Module]:
        return {LANGUAGE_PREFIX: self.language_model, PROJECTOR_PREFIX: self.mm_projector,
                HEAD_PREFIX: self.silent_head, VISION_PREFIX: self.vision_tower}

    # ---- weights door -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The on-disk key layout (see the module docstring)."""
        out: dict[str, torch.Tensor] = {}
        for prefix, module in self._named_modules().items():
            for key, tensor in module.state_dict().items():
                out[prefix + _strip_vision_model(key) if prefix == VISION_PREFIX else prefix + key] = tensor
        return out

    def _load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        modules = self._named_modules()
        given: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in modules}
        unexpected = []
        for key, tensor in weights.items():
            prefix = next((p for p in modules if key.startswith(p)), None)
            if key in UNUSED_KEYS:
                continue
            if prefix is None:
                unexpected.append(key)
                continue
            local = key[len(prefix):]
            if prefix == VISION_PREFIX:
                local = _module_vision_key(local, modules[prefix].state_dict())
            given[prefix][local] = tensor
        missing = []
        for prefix, module in modules.items():
            expected = module.state_dict()
            missing += [prefix + k for k in expected if k not in given[prefix]]
            unexpected += [prefix + k for k in given[prefix] if k not in expected]
            for k, v in given[prefix].items():
                if k in expected and expected[k].shape != v.shape:
                    raise ValueError(f"weight {prefix + k}: shape {tuple(v.shape)} on disk, "
                                     f"{tuple(expected[k].shape)} expected")
        if missing or unexpected:
            raise KeyError(f"perception_decision weights do not match: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
        for prefix, module in modules.items():
            module.load_state_dict(given[prefix], strict=True)

    def save(self, part_dir: str | Path) -> Path:
        """Write the part directory format that :meth:`load` reads."""
        part_dir = Path(part_dir)
        (part_dir / VISION_DIR).mkdir(parents=True, exist_ok=True)
        config = self.language_model.config.to_dict()
        config.pop("_attn_implementation", None)
        config.update(model_type="dispider_decision", architectures=["DispiderDecision"],
                      perception_vision_tower=VISION_DIR, perception_select_layer=self.select_layer,
                      perception_select_feature=self.select_feature, perception_projector_type="pool",
                      perception_hidden_size=self.raw_dim, resolution=self.resolution, pool_num=self.pool_num)
        (part_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
        clip_config = self.vision_tower.config.to_dict()
        clip_config.pop("_attn_implementation", None)
        (part_dir / VISION_DIR / "config.json").write_text(json.dumps(clip_config, indent=2, default=str))
        (part_dir / VISION_DIR / "preprocessor_config.json").write_text(
            json.dumps(_preprocessor_config(self.vision_tower.config.image_size), indent=2))
        self.tokenizer.save_pretrained(part_dir)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, part_dir / WEIGHTS_FILE, metadata={"format": "pt"})
        return part_dir


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (any text encodes) carrying Dispider's special tokens as single ids.

    A stand-in for the compact Qwen2 tokenizer in tests and random checkpoints.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[1],
                                   additional_special_tokens=list(SPECIAL_TOKENS[2:]))


def _qwen_config_from(config: dict[str, Any]) -> Qwen2Config:
    fields = {k: v for k, v in config.items()
              if k not in PERCEPTION_CONFIG_KEYS and k not in ("model_type", "architectures", "auto_map")}
    return Qwen2Config(**fields)


def _clip_config_from(config: dict[str, Any]) -> CLIPVisionConfig:
    if config.get("model_type") == "clip":  # a full CLIPConfig: take its vision half
        config = config["vision_config"]
    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    return CLIPVisionConfig(**fields)


def _strip_vision_model(key: str) -> str:
    """Door keys carry ``vision_model.``; transformers 5 CLIPVisionModel keys have no such level."""
    return key[len("vision_model."):] if key.startswith("vision_model.") else key


def _module_vision_key(disk_key: str, expected: dict[str, torch.Tensor]) -> str:
    """The module's name for a door key: transformers 4 CLIPVisionModel keys keep the ``vision_model.`` level."""
    nested = "vision_model." + disk_key
    return nested if disk_key not in expected and nested in expected else disk_key


def _preprocessor_config(image_size: int) -> dict[str, Any]:
    return {
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": image_size},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD, "do_convert_rgb": True,
    }


def _int_sqrt(n: int) -> int:
    root = int(round(n**0.5))
    if root * root != n:
        raise ValueError(f"{n} is not a square")
    return root


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
