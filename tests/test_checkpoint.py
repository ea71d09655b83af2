"""dispider_vllm.checkpoint: tiny random checkpoints, opening, validation, splitting, tokenizers, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dispider_vllm.checkpoint import (
    CheckpointError,
    ensure_default_checkpoint,
    make_random_checkpoint,
    open_checkpoint,
    open_perception_decision,
    split_checkpoint,
)
from dispider_vllm.checkpoint import safetensors_io

EMBEDDED = "model.compressor.compressor."
SPECIAL_TOKENS = ["<image>", "<im_patch>", "<has_answer>", "<to_do>", "<keep_silent>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]


@pytest.fixture(scope="module")
def v2(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("v2"), seed=0, layout="v2")


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("v1"), seed=0, layout="v1")


@pytest.fixture(scope="module")
def v2_split(v2, tmp_path_factory):
    return split_checkpoint(v2, tmp_path_factory.mktemp("v2split") / "out")


def broken_copy(v2: Path, tmp_path: Path) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(v2, target)
    return target


def edit_json(file: Path, edit) -> None:
    value = json.loads(file.read_text())
    edit(value)
    file.write_text(json.dumps(value))


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def spec_split_name(key: str) -> tuple[str, str | None]:
    """The naming rule of the brief, written independently of the implementation: (part, split name)."""
    if key.startswith(EMBEDDED):
        return compact_spec_name(key[len(EMBEDDED) :])
    for projector in ("model.compress_projector.", "model.clip_projector."):
        if key.startswith(projector):
            return "reaction", key[len("model.") :]
    return "reaction", key


def compact_spec_name(key: str) -> tuple[str, str | None]:
    if key.startswith("model.vision_tower.vision_tower.vision_model."):
        return "perception_decision", "vision_tower." + key[len("model.vision_tower.vision_tower.") :]
    if key.startswith("model.mm_projector."):
        return "perception_decision", "mm_projector." + key[len("model.mm_projector.") :].removeprefix("mlp.")
    if key == "lm_head.weight":
        return "perception_decision", None  # the unused compact lm_head is dropped
    if key.startswith("model."):
        return "perception_decision", "language_model." + key[len("model.") :]
    return "perception_decision", key


# ------------------------------------------------------------------------------------------------- opening


def test_random_v2_opens_with_the_agreed_sizes(v2):
    ckpt = open_checkpoint(v2)
    assert ckpt.format_version == 2
    r, c, v = ckpt.reaction, ckpt.compact, ckpt.vision
    assert (r.hidden_size, r.intermediate_size, r.num_hidden_layers, r.num_attention_heads, r.num_key_value_heads, r.head_dim) == (256, 512, 2, 4, 2, 64)
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (128, 256, 2, 2, 1, 64)
    assert (v.image_size, v.patch_size, v.num_patches, v.hidden_size, v.intermediate_size, v.num_hidden_layers) == (224, 14, 256, 64, 128, 2)
    assert r.vocab_size % 64 == 0 and c.vocab_size % 64 == 0
    assert (ckpt.compress_input_size, ckpt.clip_input_size, ckpt.perception_hidden_size) == (128, 256, 256)
    assert (ckpt.select_layer, ckpt.select_feature, ckpt.resolution, ckpt.pool_num) == (-2, "patch", 64, 4)
    assert ckpt.reaction_tokenizer_dir == v2.resolve() and ckpt.compact_tokenizer_dir == v2.resolve() / "perception_decision"
    assert len(ckpt.reaction_tensors) == 1 + 2 * 12 + 1 + 1 + 8
    assert len(ckpt.perception_decision_tensors) == (1 + 2 * 12 + 1) + 4 + 1 + (5 + 2 * 16 + 2)
    assert [d.source.key for d in ckpt.dropped_tensors] == [EMBEDDED + "lm_head.weight"]
    assert ckpt.preprocessor_config["crop_size"] == {"height": 224, "width": 224}


def test_random_v1_opens_to_the_same_view(v1, v2):
    one, two = open_checkpoint(v1), open_checkpoint(v2)
    assert one.format_version == 1
    assert "long" in v1.name and "qwen" in v1.name and "stream" in one.compact_dir.name
    assert json.loads((v1 / "config.json").read_text())["mm_compressor"] == str(one.compact_dir)
    for field in ("reaction", "compact", "vision", "compress_input_size", "clip_input_size", "perception_hidden_size",
                  "select_layer", "resolution", "pool_num", "reaction_tokens", "compact_tokens"):  # fmt: skip
        assert getattr(one, field) == getattr(two, field), field
    assert set(one.reaction_tensors) == set(two.reaction_tensors)
    assert set(one.perception_decision_tensors) == set(two.perception_decision_tensors)
    # The embedded copy overrides the compressor's own weights; CLIP is not embedded and comes from the compressor dir.
    assert one.perception_decision_tensors["silent_head.weight"].key == EMBEDDED + "silent_head.weight"
    assert one.perception_decision_tensors["mm_projector.0.weight"].key == EMBEDDED + "model.mm_projector.mlp.0.weight"
    clip = one.perception_decision_tensors["vision_tower.vision_model.embeddings.class_embedding"]
    assert clip.file.parent == one.compact_dir
    assert any(d.reason.startswith("overridden") for d in one.dropped_tensors)


def test_tensor_iterators_stream_split_names(v2):
    ckpt = open_checkpoint(v2)
    names = [name for name, tensor in ckpt.iter_perception_decision_tensors()]
    assert names == list(ckpt.perception_decision_tensors)
    name, tensor = next(ckpt.iter_reaction_tensors())
    assert name == "model.embed_tokens.weight" and tuple(tensor.shape) == (ckpt.reaction.vocab_size, 256)


# -------------------------------------------------------------------------------------------------- split


@pytest.mark.parametrize("layout", ["v2", "v1"])
def test_split_round_trips_every_tensor(layout, v1, v2, v2_split, tmp_path):
    src = {"v1": v1, "v2": v2}[layout]
    split = v2_split if layout == "v2" else split_checkpoint(src, tmp_path / "out")
    ckpt = open_checkpoint(src)
    outputs = {"reaction": all_tensors(split.reaction_dir), "perception_decision": all_tensors(split.perception_decision_dir)}

    sources = all_tensors(src)  # reaction dir: reaction + embedded compact tensors
    own_compact = all_tensors(ckpt.compact_dir) if layout == "v1" else {}
    expected: dict[tuple[str, str], torch.Tensor] = {}
    for key, tensor in own_compact.items():  # v1: the compressor's own weights first ...
        part, name = compact_spec_name(key)
        if name is not None:
            expected[(part, name)] = tensor
    for key, tensor in sources.items():  # ... then what the reaction shards hold, overriding them
        part, name = spec_split_name(key)
        if name is not None:
            expected[(part, name)] = tensor

    written = {(part, name) for part, tensors in outputs.items() for name in tensors}
    assert written == set(expected), "the split writes exactly the mapped tensors, nothing else"
    for (part, name), tensor in expected.items():
        out = outputs[part][name]
        assert out.dtype == tensor.dtype and torch.equal(out, tensor), (part, name)


def test_v1_and_v2_of_one_seed_split_identically(v1, v2_split, tmp_path):
    split = split_checkpoint(v1, tmp_path / "out")
    for part in ("reaction_dir", "perception_decision_dir"):
        a, b = all_tensors(getattr(split, part)), all_tensors(getattr(v2_split, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_split_streams_one_tensor_at_a_time(v2, tmp_path, monkeypatch):
    alive, peak = set(), [0]
    original = safetensors_io._load_tensor

    def tracked(handle, key):
        tensor = original(handle, key)
        alive.add(key)
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(tensor, alive.discard, key)
        return tensor

    monkeypatch.setattr(safetensors_io, "_load_tensor", tracked)
    max_shard = 1 << 20
    lines = []
    split = split_checkpoint(v2, tmp_path / "out", max_shard_bytes=max_shard, progress=lines.append)
    assert peak[0] == 1, "never more than one source tensor in memory"

    shards = sorted(split.reaction_dir.glob("model-*.safetensors"))
    assert len(shards) >= 5 and sum("reaction: wrote" in line for line in lines) == len(shards)
    index = json.loads((split.reaction_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    for shard in shards:
        tensors = load_file(shard)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= max_shard or len(tensors) == 1
        assert all(index["weight_map"][k] == shard.name for k in tensors)


def test_streaming_writer_keeps_every_dtype_bit_exact(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f16": torch.randn(7).to(torch.float16),
        "scalar": torch.tensor(2.5),
        "ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    sources = safetensors_io.read_weight_files(tmp_path).tensors
    plan = [(f"renamed.{key}", sources[key]) for key in tensors]
    safetensors_io.write_safetensors_streaming(tmp_path / "out.safetensors", plan, safetensors_io.iter_tensors(plan))
    out = load_file(tmp_path / "out.safetensors")
    assert out.keys() == {f"renamed.{key}" for key in tensors}
    for key, tensor in tensors.items():
        assert out[f"renamed.{key}"].dtype == tensor.dtype and torch.equal(out[f"renamed.{key}"], tensor)


def test_second_split_is_a_no_op_and_a_changed_source_is_split_again(v2, tmp_path):
    src = broken_copy(v2, tmp_path)  # a private copy we may touch
    out = tmp_path / "out"
    split_checkpoint(src, out)
    marker = json.loads((out / "dispider_split.json").read_text())
    assert marker["source"] == str(src.resolve()) and marker["source_format_version"] == 2
    assert marker["tensor_counts"] == {"reaction": 35, "perception_decision": 70, "dropped": 1}
    stamp = (out / "reaction" / "config.json").stat().st_mtime_ns

    lines = []
    split_checkpoint(src, out, progress=lines.append)
    assert lines == [f"up to date: {out.resolve()}"]
    assert (out / "reaction" / "config.json").stat().st_mtime_ns == stamp

    os.utime(src / "config.json", ns=(1, 1))
    lines.clear()
    split_checkpoint(src, out, progress=lines.append)
    assert any("wrote" in line for line in lines)


def test_split_refuses_a_directory_it_did_not_write(v2, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        split_checkpoint(v2, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_split_configs(v2_split):
    reaction = json.loads((v2_split.reaction_dir / "config.json").read_text())
    assert reaction["model_type"] == "qwen2" and reaction["architectures"] == ["DispiderReactionForCausalLM"]
    assert (reaction["compress_hidden_size"], reaction["clip_hidden_size"]) == (128, 256)
    assert (reaction["image_token_id"], reaction["keep_silent_token_id"], reaction["im_end_token_id"]) == (1003, 1007, 1002)
    part = open_perception_decision(v2_split.perception_decision_dir)
    for key in ("perception_select_layer", "perception_select_feature", "resolution", "pool_num", "perception_hidden_size"):
        assert key in part.config
    assert (part.language.hidden_size, part.vision.hidden_size, part.perception_hidden_size) == (128, 64, 256)
    assert part.tokens.pad == 1003 and part.tokens.image == 1005
    assert part.vision_tower_dir.joinpath("preprocessor_config.json").is_file()
    projector = part.load_tensors("mm_projector.")
    assert sorted(projector) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert tuple(projector["0.weight"].shape) == (128, 256)


# ---------------------------------------------------------------------------------------------- tokenizers


def test_tokenizers_load_with_autotokenizer_and_carry_single_special_tokens(v2, v2_split):
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(v2)
    for directory, ids, extra in (
        (v2_split.reaction_dir, ckpt.reaction_tokens, []),
        (v2_split.perception_decision_dir, ckpt.compact_tokens, ["<pad>"]),
    ):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        assert type(tokenizer).__name__ == "Qwen2Tokenizer"
        single = {}
        for text in SPECIAL_TOKENS + extra:
            encoded = tokenizer.encode(text, add_special_tokens=False)
            assert len(encoded) == 1, (directory, text)
            single[text] = encoded[0]
        assert [single[t] for t in ("<image>", "<im_patch>", "<has_answer>", "<to_do>", "<keep_silent>", "<|im_end|>")] == [
            ids.image, ids.im_patch, ids.has_answer, ids.to_do, ids.keep_silent, ids.im_end]  # fmt: skip
        assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id == ids.pad
        assert max(single.values()) < ckpt.reaction.vocab_size
        text = "This contains a clip sampled in 0 to 16 seconds"
        assert tokenizer.decode(tokenizer.encode(text + "<image>")) == text + "<image>"
        assert tokenizer.decode(tokenizer.encode(text + "<keep_silent>"), skip_special_tokens=True) == text
    # The two tokenizers number the Dispider tokens differently, as real ones may.
    assert ckpt.reaction_tokens.image != ckpt.compact_tokens.image


def test_random_checkpoint_is_deterministic_for_a_seed(tmp_path):
    a = make_random_checkpoint(tmp_path / "a", seed=3)
    b = make_random_checkpoint(tmp_path / "b", seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    c = make_random_checkpoint(tmp_path / "c", seed=4)
    assert (a / "model-00001-of-00002.safetensors").read_bytes() != (c / "model-00001-of-00002.safetensors").read_bytes()


def test_ensure_default_checkpoint_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("DISPIDER_HOME", str(tmp_path / "home"))
    first = ensure_default_checkpoint()
    assert first.checkpoint_dir.is_relative_to(tmp_path / "home")
    assert (first.reaction_dir / "config.json").is_file() and (first.perception_decision_dir / "model.safetensors").is_file()
    stamp = (first.checkpoint_dir / "config.json").stat().st_mtime_ns
    assert ensure_default_checkpoint() == first
    assert (first.checkpoint_dir / "config.json").stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------ broken inputs


def _drop_tensor(ckpt: Path, key: str) -> None:
    index_file = ckpt / "model.safetensors.index.json"
    shard = ckpt / json.loads(index_file.read_text())["weight_map"][key]
    tensors = load_file(shard)
    del tensors[key]
    save_file(tensors, shard)
    edit_json(index_file, lambda index: index["weight_map"].pop(key))


def _reshape_tensor(ckpt: Path, key: str) -> None:
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, shard)


BREAKAGES = {
    "missing shard": (lambda c: (c / "model-00002-of-00002.safetensors").unlink(),
                      "model.safetensors.index.json", "model.compressor.compressor.", "absent"),
    "wrong shape": (lambda c: _reshape_tensor(c, "model.layers.1.mlp.up_proj.weight"),
                    "model-00001-of-00002.safetensors", "model.layers.1.mlp.up_proj.weight", "shape"),
    "wrong CLIP shape": (lambda c: _reshape_tensor(c, EMBEDDED + "model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight"),
                         "model-00002-of-00002.safetensors", "position_embedding.weight", "shape"),
    "unknown model_type": (lambda c: edit_json(c / "config.json", lambda d: d.update(model_type="llama")),
                           "config.json", "model_type", "unknown"),
    "unknown compact model_type": (lambda c: edit_json(c / "perception_decision/config.json", lambda d: d.update(model_type="qwen2")),
                                   "perception_decision/config.json", "model_type", "unknown"),
    "missing tensor": (lambda c: _drop_tensor(c, "model.norm.weight"),
                       "model.safetensors.index.json", "model.norm.weight", "missing tensor"),
    "missing silent_head": (lambda c: _drop_tensor(c, EMBEDDED + "silent_head.weight"),
                            "model.safetensors.index.json", EMBEDDED + "silent_head.weight", "missing tensor"),
    "missing config key": (lambda c: edit_json(c / "config.json", lambda d: d.pop("hidden_size")),
                           "config.json", "hidden_size", "missing"),
    "missing compact key": (lambda c: edit_json(c / "perception_decision/config.json", lambda d: d.pop("resolution")),
                            "perception_decision/config.json", "resolution", "missing"),
    "missing vision key": (lambda c: edit_json(c / "perception_decision/vision_tower/config.json", lambda d: d.pop("patch_size")),
                           "vision_tower/config.json", "patch_size", "missing"),
    "manifest count": (lambda c: edit_json(c / "dispider_checkpoint_manifest.json", lambda d: d["embedded_perception_decision"].update(verified_key_count=3)),
                       "dispider_checkpoint_manifest.json", "verified_key_count", "shards hold"),
    "projector type": (lambda c: edit_json(c / "config.json", lambda d: d.update(decision_projector_type="linear")),
                       "config.json", "decision_projector_type", "unsupported"),
}  # fmt: skip


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_checkpoints_name_the_file_and_the_key(breakage, v2, tmp_path):
    ckpt = broken_copy(v2, tmp_path)
    damage, file, key, words = BREAKAGES[breakage]
    damage(ckpt)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(ckpt)
    message = str(caught.value)
    assert str(caught.value.file).endswith(file), message
    assert key in message and words in message, message


def test_broken_v1_compressor_path(v1, tmp_path):
    copy = tmp_path / "dispider-long-qwen-copy"
    shutil.copytree(v1, copy)
    edit_json(copy / "config.json", lambda d: d.update(mm_compressor="/nowhere/stream-compressor"))
    with pytest.raises(CheckpointError, match="mm_compressor") as caught:
        open_checkpoint(copy)
    assert caught.value.file == copy.resolve() / "config.json"


# ---------------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dispider_vllm.checkpoint", *args], capture_output=True, text=True, timeout=120)


def test_cli_inspect_and_split(v2, tmp_path):
    inspect = run_cli("inspect", str(v2))
    assert inspect.returncode == 0, inspect.stderr
    assert "layout v2" in inspect.stdout and "image placeholder <image> = 1003" in inspect.stdout
    assert "reaction 35" in inspect.stdout and "perception_decision 70" in inspect.stdout

    split = run_cli("split", str(v2), str(tmp_path / "out"), "--max-shard-size", "3MiB")
    assert split.returncode == 0, split.stderr
    assert split.stdout.count("reaction: wrote model-") == 3 and "perception_decision: wrote model.safetensors" in split.stdout
    assert (tmp_path / "out" / "reaction" / "model.safetensors.index.json").is_file()


def test_cli_bad_path_exits_2_with_one_clear_line(tmp_path):
    result = run_cli("inspect", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"dispider-checkpoint: error: {tmp_path / 'missing'}: not a checkpoint directory"
    assert result.stdout == ""
