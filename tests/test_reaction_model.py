"""The reaction model inside the real vLLM CPU engine, against an independent plain-PyTorch computation.

The reference below uses only transformers' Qwen2 (``inputs_embeds``) and ``torch.nn`` projectors built
from the checkpoint tensors; it shares no code with ``dispider_vllm.reaction``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from dispider_vllm.checkpoint.random import ensure_default_checkpoint

MAX_MODEL_LEN = 8192
CHUNK_TOKENS = 1024  # smaller than a bundle prompt, so prefill is chunked
QUESTION = "What is happening in the video right now?"


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def reaction_dir() -> Path:
    return Path(ensure_default_checkpoint().split.reaction_dir)


@pytest.fixture(scope="module")
def reaction_config(reaction_dir) -> dict:
    return json.loads((reaction_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def llm(reaction_dir, reaction_config):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM

    engine = LLM(
        str(reaction_dir),
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=CHUNK_TOKENS,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        limit_mm_per_prompt={"image": 1},
        max_logprobs=reaction_config["vocab_size"],
        logprobs_mode="raw_logits",
        enforce_eager=True,
        seed=0,
    )
    yield engine
    del engine


def make_bundle(config: dict, k: int, t: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "clip_raw": torch.randn(k, 1024, config["clip_hidden_size"], generator=g),
        "clip_memory": torch.randn(k, 64, config["compress_hidden_size"], generator=g),
        "global_memory": torch.randn(t, config["compress_hidden_size"], generator=g),
    }


def prompt_text(tokenizer, config: dict) -> str:
    from dispider_vllm.reaction.prompt import build_reaction_prompt

    placeholder = tokenizer.convert_ids_to_tokens(config["image_token_id"])
    return build_reaction_prompt(QUESTION, image_placeholder=placeholder)


# ---------------------------------------------------------------------------------------------- reference
class ReferenceReaction:
    """Spec-literal: embed the text, splice [clip_proj(raw_j), compress_proj(M_j)]_j + compress_proj(G)."""

    def __init__(self, reaction_dir: Path, config: dict):
        tensors = _read_all(reaction_dir)
        qwen_config = Qwen2Config.from_pretrained(reaction_dir)
        self.lm = Qwen2ForCausalLM(qwen_config).float().eval()
        lm_state = {k: v for k, v in tensors.items() if not k.startswith(("clip_projector.", "compress_projector."))}
        self.lm.load_state_dict(lm_state, strict=True)
        self.clip_projector = _mlp(tensors, "clip_projector")
        self.compress_projector = _mlp(tensors, "compress_projector")
        self.image_token_id = config["image_token_id"]

    @torch.no_grad()
    def prompt_embeds(self, prompt_ids: list[int], bundle: dict) -> torch.Tensor:
        spot = prompt_ids.index(self.image_token_id)
        pieces = []
        for raw, memory in zip(bundle["clip_raw"], bundle["clip_memory"]):
            pieces += [self.clip_projector(raw), self.compress_projector(memory)]
        pieces.append(self.compress_projector(bundle["global_memory"]))
        embed = self.lm.get_input_embeddings()
        before = embed(torch.tensor(prompt_ids[:spot]))
        after = embed(torch.tensor(prompt_ids[spot + 1 :]))
        return torch.cat([before, *pieces, after])

    @torch.no_grad()
    def greedy(self, prompt_ids: list[int], bundle: dict, steps: int) -> tuple[list[int], list[torch.Tensor]]:
        embeds = self.prompt_embeds(prompt_ids, bundle)
        tokens, logits_per_step = [], []
        for _ in range(steps):
            logits = self.lm(inputs_embeds=embeds[None]).logits[0, -1]
            token = int(logits.argmax())
            tokens.append(token)
            logits_per_step.append(logits)
            embeds = torch.cat([embeds, self.lm.get_input_embeddings()(torch.tensor([token]))])
        return tokens, logits_per_step


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _mlp(tensors: dict, name: str) -> torch.nn.Sequential:
    first, second = tensors[f"{name}.0.weight"], tensors[f"{name}.2.weight"]
    mlp = torch.nn.Sequential(
        torch.nn.Linear(first.shape[1], first.shape[0]), torch.nn.GELU(), torch.nn.Linear(second.shape[1], second.shape[0])
    )
    mlp[0].weight.data, mlp[0].bias.data = first, tensors[f"{name}.0.bias"]
    mlp[2].weight.data, mlp[2].bias.data = second, tensors[f"{name}.2.bias"]
    return mlp.eval()


# ---------------------------------------------------------------------------------------------- tests
def _generate(llm, prompt: str, bundle: dict, steps: int, logprobs: int | None = None):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=steps, temperature=0.0, logprobs=logprobs, ignore_eos=True)
    return llm.generate({"prompt": prompt, "multi_modal_data": {"image": bundle}}, params, use_tqdm=False)[0]


@pytest.mark.parametrize("k,t,seed", [(4, 12, 1), (1, 1, 2), (2, 30, 3)])
def test_generation_matches_plain_pytorch(llm, reaction_dir, reaction_config, k, t, seed):
    tokenizer = AutoTokenizer.from_pretrained(reaction_dir)
    bundle = make_bundle(reaction_config, k, t, seed)
    prompt = prompt_text(tokenizer, reaction_config)
    steps = 6
    vocab = reaction_config["vocab_size"]
    output = _generate(llm, prompt, bundle, steps, logprobs=vocab)

    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert len(output.prompt_token_ids) == len(prompt_ids) - 1 + 1088 * k + t
    reference = ReferenceReaction(reaction_dir, reaction_config)
    ref_tokens, ref_logits = reference.greedy(prompt_ids, bundle, steps)

    assert list(output.outputs[0].token_ids) == ref_tokens
    for step, (ref, step_logprobs) in enumerate(zip(ref_logits, output.outputs[0].logprobs)):
        got = torch.full((vocab,), float("nan"))
        for token_id, logprob in step_logprobs.items():
            got[token_id] = logprob.logprob
        assert torch.isfinite(got).all(), f"step {step}: vLLM returned fewer than {vocab} logits"
        torch.testing.assert_close(got, ref[:vocab], atol=2e-3, rtol=1e-3, msg=lambda m: f"logits differ at step {step}: {m}")


def test_prefix_cache_hits_for_the_same_bundle_only(llm, reaction_dir, reaction_config):
    tokenizer = AutoTokenizer.from_pretrained(reaction_dir)
    prompt = prompt_text(tokenizer, reaction_config)
    bundle = make_bundle(reaction_config, 2, 8, seed=11)
    first = _generate(llm, prompt, bundle, 2)
    again = _generate(llm, prompt, bundle, 2)
    other = _generate(llm, prompt, make_bundle(reaction_config, 2, 8, seed=12), 2)
    block = llm.llm_engine.vllm_config.cache_config.block_size
    prompt_length = len(first.prompt_token_ids)
    text_before_bundle = tokenizer.encode(prompt, add_special_tokens=False).index(reaction_config["image_token_id"])
    # The same bundle: every full block is reused (the last token is always recomputed).
    assert again.num_cached_tokens >= (prompt_length - 1) // block * block
    # Another bundle: at most the text before the placeholder is shared.
    assert other.num_cached_tokens <= text_before_bundle
    assert list(again.outputs[0].token_ids) == list(first.outputs[0].token_ids)


def _bad_bundles(config: dict) -> dict[str, tuple[object, str]]:
    good = make_bundle(config, 2, 4, seed=5)
    return {
        "raw tokens": ({**good, "clip_raw": good["clip_raw"][:, :1000]}, "clip_raw"),
        "memory dim": ({**good, "clip_memory": torch.randn(2, 64, 7)}, "clip_memory"),
        "clip counts differ": ({**good, "clip_memory": good["clip_memory"][:1]}, "clips"),
        "integer dtype": ({**good, "global_memory": torch.ones(4, config["compress_hidden_size"], dtype=torch.int64)}, "dtype"),
        "missing field": ({"clip_raw": good["clip_raw"], "clip_memory": good["clip_memory"]}, "global_memory"),
        "too many clips": (make_bundle(config, 5, 4, seed=6), "retrieved clips"),
        "not a dict": (torch.randn(3, 3), "dict"),
    }


def test_bad_bundle_gets_a_clear_error_and_the_engine_keeps_serving(llm, reaction_dir, reaction_config):
    tokenizer = AutoTokenizer.from_pretrained(reaction_dir)
    prompt = prompt_text(tokenizer, reaction_config)
    for case, (bundle, words) in _bad_bundles(reaction_config).items():
        with pytest.raises(ValueError, match=words):
            _generate(llm, prompt, bundle, 2)
    served = _generate(llm, prompt, make_bundle(reaction_config, 1, 2, seed=7), 3)
    assert len(served.outputs[0].token_ids) == 3
