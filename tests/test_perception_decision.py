"""The batched, cached perception encoder and decision engine against the spec-literal reference (CPU, fp32)."""

from __future__ import annotations

import gc
import logging
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))

from reference_dispider import reference_clip_features, reference_stream  # noqa: E402

from dispider_vllm.decision import DecisionConfig, DecisionEngine, KeptClipsUsage  # noqa: E402
from dispider_vllm.decision.engine import clip_bytes, clip_bytes_at_shapes  # noqa: E402
from dispider_vllm.perception.clips import ClipWindow, make_frames_clip  # noqa: E402
from dispider_vllm.perception.clips import make_clip as make_clip_of  # noqa: E402
from dispider_vllm.perception.encoder import PerceptionEncoder, merge_neighbours, pool_tokens  # noqa: E402
from dispider_vllm.perception.frames import PreprocessorConfig  # noqa: E402
from dispider_vllm.perception.modules import WEIGHTS_FILE, PerceptionDecisionModules  # noqa: E402
from dispider_vllm.types import Clip, ClipFeatures, DecisionEvent, Frame, Trigger  # noqa: E402
from dispider_vllm.video.synth import make_test_frames  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module")
def part_dir(tmp_path_factory) -> Path:
    return PerceptionDecisionModules.random(seed=0).save(tmp_path_factory.mktemp("perception_decision"))


@pytest.fixture(scope="module")
def modules(part_dir) -> PerceptionDecisionModules:
    return PerceptionDecisionModules.load(part_dir)


def make_clip(index: int, start: float, seed: int) -> Clip:
    generator = torch.Generator().manual_seed(seed)
    return Clip(index=index, start=start, end=start + 16.0, pixels=torch.randn(16, 3, 224, 224, generator=generator))


def fake_features(modules: PerceptionDecisionModules, count: int, seed: int) -> list[ClipFeatures]:
    """Random clip features (decision tests need no CLIP); M/T scaled like post-norm hidden states."""
    generator = torch.Generator().manual_seed(seed)
    hidden, raw_dim = modules.hidden_size, modules.raw_dim
    return [
        ClipFeatures(index=i + 1, start=16.0 * i, end=16.0 * (i + 1),
                     raw=torch.randn(1024, raw_dim, generator=generator),
                     memory=torch.randn(64, hidden, generator=generator),
                     indicator=torch.randn(hidden, generator=generator))
        for i in range(count)
    ]


def forced(triggers: set[int], otherwise: bool | None = False):
    return lambda clip_index: True if clip_index in triggers else otherwise


def assert_matches_reference(items: list[DecisionEvent | Trigger], reference, question_ids=None) -> None:
    assert [_event(i).clip_index for i in items] == [r.clip_index for r in reference]
    for item, ref in zip(items, reference):
        event = _event(item)
        assert event.logit == pytest.approx(ref.logit, abs=ATOL), f"clip {ref.clip_index}"
        assert event.question_id == ref.question_id
        assert isinstance(item, Trigger) == ref.responded, f"clip {ref.clip_index}"
        if isinstance(item, Trigger):
            assert item.retrieved == ref.retrieved
            torch.testing.assert_close(item.bundle.raw, ref.raw, atol=ATOL, rtol=0)
            torch.testing.assert_close(item.bundle.memory, ref.memory, atol=ATOL, rtol=0)
            torch.testing.assert_close(item.bundle.global_memory, ref.global_memory, atol=ATOL, rtol=0)
            assert item.bundle.num_positions == 1088 * len(ref.retrieved) + len(ref.global_memory)


def _event(item: DecisionEvent | Trigger) -> DecisionEvent:
    return item.event if isinstance(item, Trigger) else item


def by_stream(items) -> dict[str, list]:
    out: dict[str, list] = {}
    for item in items:
        out.setdefault(_event(item).stream_id, []).append(item)
    return out


# ---- weights door ---------------------------------------------------------------------------------------------
def test_load_roundtrip_and_strict_keys(part_dir, modules, tmp_path):
    original = PerceptionDecisionModules.random(seed=0)
    for key, tensor in original.state_dict().items():
        assert torch.equal(tensor, modules.state_dict()[key]), key
    assert modules.token_ids("<has_answer>") == [modules.tokenizer.convert_tokens_to_ids("<has_answer>")]
    assert modules.select_layer == -2 and modules.resolution == 64 and modules.pool_num == 4

    broken = PerceptionDecisionModules.random(seed=0).save(tmp_path / "broken")
    weights = load_file(broken / WEIGHTS_FILE)
    weights.pop("mm_projector.2.bias")
    weights["silent_head.bias"] = torch.zeros(1)
    save_file(weights, broken / WEIGHTS_FILE)
    with pytest.raises(KeyError, match=r"mm_projector\.2\.bias.*silent_head\.bias"):
        PerceptionDecisionModules.load(broken)


# ---- perception -----------------------------------------------------------------------------------------------
def test_merge_channel_order_and_pooling():
    patches = torch.arange(256, dtype=torch.float32).reshape(1, 256, 1)  # value = patch index, row-major 16x16
    merged = merge_neighbours(patches)
    assert merged.shape == (1, 64, 4)
    assert merged[0, 0].tolist() == [0, 1, 16, 17]  # TL, TR, BL, BR
    assert merged[0, 1].tolist() == [2, 3, 18, 19]
    assert merged[0, 8].tolist() == [32, 33, 48, 49]  # second merged row
    pooled = pool_tokens(merged.reshape(1, 1, 64, 4), pool_num=4)
    assert pooled.shape == (1, 5, 4)
    top_left = merged[0].reshape(8, 8, 4)[:4, :4].reshape(16, 4).mean(0)
    assert torch.allclose(pooled[0, 0], top_left) and torch.allclose(pooled[0, 4], merged[0].mean(0))


def test_encode_matches_reference_batched(modules):
    clips = [make_clip(1, 0.0, seed=1), make_clip(7, 96.4, seed=2), make_clip(120, 1904.6, seed=3)]
    encoder = PerceptionEncoder(modules, max_frames_per_batch=20, max_clips_per_pass=2)  # forces chunking
    features = encoder.encode(clips)
    for clip, got in zip(clips, features):
        want = reference_clip_features(modules, clip)
        assert (got.index, got.start, got.end) == (clip.index, clip.start, clip.end)
        assert got.raw.shape == (1024, modules.raw_dim) and got.raw.device.type == "cpu"
        assert got.memory.shape == (64, modules.hidden_size) and got.indicator.shape == (modules.hidden_size,)
        torch.testing.assert_close(got.raw, want.raw, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.memory, want.memory, atol=ATOL, rtol=0)
        torch.testing.assert_close(got.indicator, want.indicator, atol=ATOL, rtol=0)


@pytest.mark.parametrize("max_graph_clips", [8, 0], ids=["static-path", "eager-path"])
def test_clips_of_frames_are_preprocessed_by_the_encoder_as_on_the_host(modules, max_graph_clips):
    """Clips that come as uint8 frames (a GPU sidecar's) get the features of the same clips preprocessed on the host,
    within 1% of the features' scale, in one batch with preprocessed clips and frames of another size; another
    clip's features are far off (what the tolerance tells apart)."""
    def window(index: int, size: tuple[int, int], seed: int) -> ClipWindow:
        frames = make_test_frames(seconds=16, fps=1, size=size, seed=seed)
        return ClipWindow(index, 16.0 * index, 16.0 * (index + 1), tuple(frames[:16]))

    config = PreprocessorConfig()
    first, second = window(0, (320, 240), seed=1), window(1, (200, 150), seed=2)
    clips = [make_clip_of(first, config), make_frames_clip(first, config), make_frames_clip(second, config),
             make_clip_of(second, config)]
    assert [clip.preprocessed for clip in clips] == [True, False, False, True]
    large = ClipWindow(2, 32.0, 48.0, tuple(Frame(float(i), np.zeros((720, 1281, 3), np.uint8)) for i in range(16)))
    assert make_frames_clip(large, config).preprocessed  # above 1280x720: preprocessed on the host
    features = PerceptionEncoder(modules, max_graph_clips=max_graph_clips, preprocessor=config).encode(clips)
    for name in ("raw", "memory", "indicator"):
        host_first, frames_first, frames_second, host_second = (getattr(f, name) for f in features)
        scale = host_first.abs().max()
        assert (frames_first - host_first).abs().max() < 0.01 * scale, name
        assert (frames_second - host_second).abs().max() < 0.01 * scale, name
        assert (host_second - host_first).abs().max() > 0.3 * scale, name


@pytest.mark.parametrize("max_graph_clips", [8, 0], ids=["static-path", "eager-path"])
def test_frames_perceived_as_they_arrive_give_the_clips_features(modules, max_graph_clips):
    """perceive_frames (the CLIP tower per frame, frames of two sizes and one above 1280x720 in one pass), then
    clips of those frames' tokens (Clip.features): the same raw, M and T as the clips of the frames' pixels, alone
    and in one batch with a clip of pixels; in fp32 a CLIP frame sees no other frame, so equal to rounding."""
    from concurrent.futures import Future

    from dispider_vllm.perception.clips import PerceivedFrame, make_perceived_clip

    config = PreprocessorConfig()
    sizes = [(320, 240), (200, 150), (1281, 720)]
    windows = [ClipWindow(i, 16.0 * i, 16.0 * (i + 1), tuple(make_test_frames(seconds=16, fps=1, size=size,
                                                                             seed=i + 1)[:16]))
               for i, size in enumerate(sizes)]
    encoder = PerceptionEncoder(modules, max_graph_clips=max_graph_clips, preprocessor=config)
    frames = [frame for window in windows for frame in window.frames]
    interleaved = [index for pair in zip(range(0, 16), range(16, 32)) for index in pair] + list(range(32, 48))
    shuffled = encoder.perceive_frames([frames[i].pixels for i in interleaved])  # two sizes, alternating
    tokens = [None] * 48
    for position, index in enumerate(interleaved):
        tokens[index] = shuffled[position]
    assert len(tokens) == 48 and all(t.shape == (modules.resolution, modules.raw_dim) for t in tokens)
    assert len({t.untyped_storage().data_ptr() for t in tokens}) == 48  # each frame's tokens own their storage

    def perceived(window: ClipWindow, offset: int) -> Clip:
        futures = [Future() for _ in window.frames]
        for future, frame_tokens in zip(futures, tokens[offset : offset + 16]):
            future.set_result(frame_tokens)
        return make_perceived_clip(ClipWindow(window.index, window.start, window.end, tuple(
            PerceivedFrame(f.timestamp, f.pixels, future) for f, future in zip(window.frames, futures))))

    of_tokens = [perceived(window, 16 * i) for i, window in enumerate(windows)]
    assert all(clip.perceived and clip.pixels.numel() == 0 for clip in of_tokens)
    of_pixels = [make_frames_clip(window, config) for window in windows]
    want = encoder.encode(of_pixels)
    for got in (encoder.encode(of_tokens), encoder.encode([of_tokens[0], of_pixels[1], of_tokens[2]])):
        assert [f.index for f in got] == [0, 1, 2]
        for name in ("raw", "memory", "indicator"):
            for g, w in zip(got, want):
                torch.testing.assert_close(getattr(g, name), getattr(w, name), atol=ATOL, rtol=0)
    assert (want[1].memory - want[0].memory).abs().max() > 0.3 * want[0].memory.abs().max()


def test_small_frame_passes_go_padded_to_a_bucket_and_give_the_eager_passes_tokens(modules):
    """perceive_frames of at most max_graph_frames frames runs padded to a bucket (1, 2, 4, ...: on a GPU replayed
    from a graph, here the same padded code eagerly): each frame's tokens are the unpadded pass's, whatever an
    earlier pass left in the bucket's spare rows, in the frames' order, each owning its storage; more frames, or
    graphed=False, go unpadded."""
    frames = [frame.pixels for frame in make_test_frames(seconds=7, fps=1, size=(320, 240), seed=5)]
    padded = PerceptionEncoder(modules, max_graph_frames=4)
    unpadded = PerceptionEncoder(modules, max_graph_frames=0)
    want = unpadded.perceive_frames(frames)
    assert unpadded.frame_graphs.stats.eager_runs == 0
    # 4 frames fill bucket 4; then 3 (reversed) leave a row of the pass before; 1 goes in bucket 1; 7 past the buckets
    for chosen in ([0, 1, 2, 3], [6, 5, 4], [3], list(range(7))):
        got = padded.perceive_frames([frames[i] for i in chosen])
        assert len({t.untyped_storage().data_ptr() for t in got}) == len(chosen)
        for tokens, index in zip(got, chosen):
            torch.testing.assert_close(tokens, want[index], atol=ATOL, rtol=0)
    assert padded.frame_graphs.stats.eager_runs == 3
    padded.perceive_frames(frames[:2], graphed=False)
    assert padded.frame_graphs.stats.eager_runs == 3
    assert (want[1] - want[0]).abs().max() > 0.3 * want[0].abs().max()  # the frames differ


@pytest.mark.parametrize("max_graph_clips", [8, 0], ids=["static-path", "eager-path"])
def test_a_prefix_cached_frame_by_frame_gives_the_clips_features(modules, max_graph_clips):
    """prefill_frames: the time prompt and each frame's raw tokens through the compact model as the frames come
    (three clips' frames in uneven pieces, the prefixes at different lengths in one call), then each clip's last 65
    positions (encode of Clip.prefix): the raw, M and T of the whole first pass, equal to rounding in fp32; with a
    wrong time prompt in the prefix, not. Slots go back to the pool."""
    from dataclasses import replace

    encoder = PerceptionEncoder(modules, max_graph_clips=max_graph_clips)
    clips = [make_clip(i, 16.0 * (i + 3), seed=30 + i) for i in range(3)]
    with torch.inference_mode():  # each frame's merged CLIP tokens, as perceive_frames gives them
        tokens = [list(encoder.raw_tokens(clip.pixels[None]).view(16, modules.resolution, -1)) for clip in clips]
    perceived = [replace(clip, pixels=torch.empty(0), features=torch.stack(frames))
                 for clip, frames in zip(clips, tokens)]
    want = encoder.encode(perceived)
    prefixes = [encoder.open_prefix(clip.index, clip.start, clip.end) for clip in clips]
    wrong = encoder.open_prefix(0, clips[0].start + 1, clips[0].end + 1)  # a time prompt the clip will not have
    for pieces in ([(0, 5), (0, 1), (0, 16)], [(5, 6), (1, 9), None], [(6, 16), (9, 16), None]):
        encoder.prefill_frames([(prefix, tokens[i][piece[0] : piece[1]])
                                for i, (prefix, piece) in enumerate(zip(prefixes, pieces)) if piece])
    encoder.prefill_frames([(wrong, tokens[0])])
    assert [p.frames for p in prefixes] == [16, 16, 16] and encoder.prefix_pool.length(prefixes[0].slot) > 16 * 64
    got = encoder.encode([replace(clip, prefix=prefix) for clip, prefix in zip(perceived, prefixes)])
    for name in ("raw", "memory", "indicator"):
        for g, w in zip(got, want):
            torch.testing.assert_close(getattr(g, name), getattr(w, name), atol=ATOL, rtol=0)
    off = encoder.encode([replace(perceived[0], prefix=wrong)])[0]
    assert (off.memory - want[0].memory).abs().max() > 1e-3
    for prefix in [*prefixes, wrong, prefixes[0]]:  # twice: nothing
        encoder.release_prefix(prefix)
    assert sorted(encoder.prefix_pool.free) == list(range(1, encoder.prefix_pool.num_slots + 1))


def test_encode_then_decide_end_to_end(modules):
    clips = [make_clip(i + 1, 16.0 * i, seed=10 + i) for i in range(3)]
    features = PerceptionEncoder(modules).encode(clips)
    engine = DecisionEngine(modules, force_respond=lambda sid, index: index == 3 or None)
    engine.open("s", "What happens?")
    items = engine.step({"s": features[:2]}) + engine.step({"s": features[2:]})
    reference = reference_stream(modules, [reference_clip_features(modules, c) for c in clips], {0: "What happens?"},
                                 lambda index: index == 3 or None)
    assert_matches_reference(items, reference)
    assert isinstance(items[-1], Trigger) and items[-1].bundle.raw.shape == (3, 1024, modules.raw_dim)


# ---- decision -------------------------------------------------------------------------------------------------
def test_single_stream_triggers_rebuild_context(modules):
    features = fake_features(modules, 7, seed=0)
    engine = DecisionEngine(modules, force_respond=lambda sid, index: index in (2, 5))
    engine.open("s", "Tell me when the dog sits.")
    items = []
    for clip in features:
        items += engine.step({"s": [clip]})
    reference = reference_stream(modules, features, {0: "Tell me when the dog sits."}, forced({2, 5}))
    assert_matches_reference(items, reference)
    triggers = [i for i in items if isinstance(i, Trigger)]
    assert [t.event.clip_index for t in triggers] == [2, 5]
    assert triggers[0].retrieved == (1, 2) and len(triggers[1].retrieved) == 4
    assert triggers[1].bundle.global_memory.shape == (5, modules.hidden_size)
    assert triggers[0].question == "Tell me when the dog sits."
    # Cache = [ANS, Q, S_1(2), ANS, S_2(3), ANS, M_6, M_7]; Q's tail is never cached.
    q_len = len(modules.token_ids("Tell me when the dog sits.<to_do>"))
    assert engine.cache_length("s") == 1 + q_len + (2 + 1) + (3 + 1) + 64 * 2


def test_logit_driven_triggers_match_reference(modules):
    features = fake_features(modules, 6, seed=5)
    engine = DecisionEngine(modules)
    engine.open("s", "Is anyone cooking?")
    items = engine.step({"s": features[:4]}) + engine.step({"s": features[4:]})
    reference = reference_stream(modules, features, {0: "Is anyone cooking?"})
    assert min(abs(r.logit) for r in reference) > 1e-3  # no verdict sits on the fence
    assert_matches_reference(items, reference)


def test_many_streams_batched_equal_alone(modules):
    streams = {
        "a": dict(features=fake_features(modules, 8, seed=11), questions={0: "What is the man doing?"},
                  triggers={3, 4}),
        "b": dict(features=fake_features(modules, 5, seed=12), questions={0: "Tell me when the dog appears."},
                  triggers={1}),
        "c": dict(features=fake_features(modules, 6, seed=13), questions={0: "Count the cars."}, triggers=set()),
        "d": dict(features=fake_features(modules, 7, seed=14),
                  questions={0: "Who enters?", 3: "Now describe the room, please."}, triggers={2, 6}),
    }
    engine = DecisionEngine(modules, force_respond=lambda sid, index: index in streams[sid]["triggers"])
    engine.open("a", streams["a"]["questions"][0])
    engine.open("gap", "a stream that leaves, so that slots are not consecutive")
    for sid in "bcd":
        engine.open(sid, streams[sid]["questions"][0])
    engine.close("gap")

    # Clips per stream per step: streams bring 0..3 clips at a time; d's new question comes after its 3rd clip.
    schedule = [dict(a=2, b=1, d=1), dict(a=1, b=2, c=3, d=2), dict(a=3, c=1), dict(a=2, b=2, c=2, d=4)]
    taken = {sid: 0 for sid in streams}
    items, asked = [], False
    for step in schedule:
        if taken["d"] == 3 and not asked:
            asked = engine.ask("d", streams["d"]["questions"][3]) == 1
        batch = {sid: streams[sid]["features"][taken[sid] : taken[sid] + n] for sid, n in step.items()}
        for sid, n in step.items():
            taken[sid] += n
        items += engine.step(batch)
    assert taken == {sid: len(s["features"]) for sid, s in streams.items()}

    results = by_stream(items)
    for sid, spec in streams.items():
        reference = reference_stream(modules, spec["features"], spec["questions"], forced(spec["triggers"]))
        assert_matches_reference(results[sid], reference)
        alone = DecisionEngine(modules, force_respond=lambda s, index, t=spec["triggers"]: index in t)
        alone.open(sid, spec["questions"][0])
        alone_items = []
        for position, clip in enumerate(spec["features"]):
            if position in spec["questions"] and position:
                alone.ask(sid, spec["questions"][position])
            alone_items += alone.step({sid: [clip]})
        for got, want in zip(results[sid], alone_items):
            assert _event(got).logit == pytest.approx(_event(want).logit, abs=ATOL)
            assert type(got) is type(want)


def test_new_question_mid_stream(modules):
    features = fake_features(modules, 6, seed=21)
    engine = DecisionEngine(modules, force_respond=lambda sid, index: index == 6)
    engine.open("s", "First question?")
    items = engine.step({"s": features[:3]})
    assert engine.ask("s", "Second question, longer than the first?") == 1
    items += engine.step({"s": features[3:]})
    questions = {0: "First question?", 3: "Second question, longer than the first?"}
    reference = reference_stream(modules, features, questions, forced({6}))
    assert_matches_reference(items, reference)
    trigger = items[-1]
    assert isinstance(trigger, Trigger) and trigger.question == "Second question, longer than the first?"
    assert trigger.event.question_id == 1 and trigger.bundle.global_memory.shape[0] == 6  # earlier clips included


@pytest.mark.parametrize("keep", [None, 2])
def test_context_window_bound(modules, keep):
    features = fake_features(modules, 10, seed=31)
    config = DecisionConfig(max_context_clips=3, context_keep_clips=keep, max_kept_clips=4)
    engine = DecisionEngine(modules, config, force_respond=lambda sid, index: index == 7)
    engine.open("s", "Anything unusual?")
    q_len = len(modules.token_ids("Anything unusual?<to_do>"))
    items, sizes = [], []
    for clip in features:
        items += engine.step({"s": [clip]})
        assert engine.cache_length("s") <= 1 + q_len + (3 + 1) + 64 * 3
        assert len(engine.kept_clip_indices("s")) <= 4
        sizes.append(engine.memory_bytes("s"))
    reference = reference_stream(modules, features, {0: "Anything unusual?"}, forced({7}), max_kept_clips=4,
                                 max_context_clips=3, context_keep_clips=keep)
    assert_matches_reference(items, reference)
    trigger = items[6]
    assert isinstance(trigger, Trigger) and set(trigger.retrieved) == {4, 5, 6, 7}
    assert trigger.bundle.global_memory.shape[0] == 4  # G over the kept clips only
    assert max(sizes[4:]) <= sizes[3] + 64 * engine.pool.bytes_per_token * 3


def test_close_and_reopen_reuses_slot(modules):
    features = fake_features(modules, 3, seed=41)
    engine = DecisionEngine(modules, force_respond=lambda sid, index: False)
    engine.open("s", "Q?")
    engine.step({"s": features})
    engine.close("s")
    engine.open("t", "Q?")
    items = engine.step({"t": features})
    assert_matches_reference(items, reference_stream(modules, features, {0: "Q?"}, forced(set())))
    with pytest.raises(ValueError):
        engine.step({"t": features[:1]})  # clip indices must increase


@pytest.mark.parametrize("fused", [True, False], ids=["vllm-kernels", "plain-torch"])
def test_compact_lm_cache_ops_with_grouped_kv_heads(fused):
    """Two KV heads for four query heads (the tiny model has one), prefixes of different lengths in one batch."""
    from transformers import Qwen2Config, Qwen2Model

    from dispider_vllm.decision import CompactLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, initializer_range=0.1, rope_theta=1e6)
    model = Qwen2Model(config).eval()
    lm = CompactLM(model, fused=fused)
    assert lm.fused == fused  # vLLM's CPU wheel ships the fused ops too, so both paths run here
    sequences = [torch.randn(n, 128) for n in (7, 12, 4)]
    with torch.no_grad():
        want = [model(inputs_embeds=s[None]).last_hidden_state[0] for s in sequences]
    got = lm.forward(sequences)
    for row, s in enumerate(sequences):
        torch.testing.assert_close(got[row, : len(s)], want[row], atol=ATOL, rtol=0)

    pool = lm.new_pool(slots=1, capacity=4)  # grows both ways
    slots = [pool.allocate() for _ in sequences]
    lm.forward_cached(pool, slots, [s[:3] for s in sequences], keep=[3, 3, 3])  # append
    pool.truncate(slots[1], 2)  # truncate
    order = [slots[2], slots[0], slots[1]]  # not consecutive in this order
    got = lm.forward_cached(pool, order, [sequences[2][3:], sequences[0][3:], sequences[1][2:]], keep=[0, 2, 0])
    torch.testing.assert_close(got[0, :1], want[2][3:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1, :4], want[0][3:], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[2, :10], want[1][2:], atol=ATOL, rtol=0)
    assert [pool.length(s) for s in slots] == [5, 2, 3]  # only the kept tokens stayed
    again = lm.forward_cached(pool, [slots[0]], [sequences[0][5:]], keep=[0])
    torch.testing.assert_close(again[0], want[0][5:], atol=ATOL, rtol=0)


def test_loads_the_split_of_the_tiny_random_checkpoint(default_checkpoint):
    """The door with the checkpoint side: its split's perception_decision part loads and encodes as specified."""
    modules = PerceptionDecisionModules.load(default_checkpoint.split.perception_decision_dir)
    for token in ("<has_answer>", "<to_do>", "<image>", "<pad>"):
        assert len(modules.token_ids(token)) == 1, token
    clip = make_clip(1, 0.0, seed=5)
    got = PerceptionEncoder(modules).encode([clip])[0]
    want = reference_clip_features(modules, clip)
    torch.testing.assert_close(got.memory, want.memory, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.indicator, want.indicator, atol=ATOL, rtol=0)


# ---- the kept clips' budget over all streams ------------------------------------------------------------------
def test_kept_clips_stay_within_a_budget_over_all_streams(modules):
    """Budget of 10 clips for 3 streams: the stream keeping the most clips loses its oldest (ties: the one opened
    first); the bytes go back to 0 when the streams close."""
    features = fake_features(modules, 12, seed=51)
    per_clip = clip_bytes(features[0])
    assert per_clip == clip_bytes_at_shapes(modules)  # what the sidecar reports for a 16-frame clip
    config = DecisionConfig(max_kept_clips=8, top_k=2, kept_clips_budget_bytes=10 * per_clip)
    engine = DecisionEngine(modules, config, force_respond=lambda sid, index: sid == "a" and index == 12 or False)
    for sid in "abc":
        engine.open(sid, "Anything unusual?")

    def kept() -> dict[str, list[int]]:
        return {sid: engine.kept_clip_indices(sid) for sid in engine.stream_ids}

    engine.step({"a": features[:6], "b": features[:3]})
    assert kept() == {"a": [1, 2, 3, 4, 5, 6], "b": [1, 2, 3], "c": []}
    assert engine.kept_clips_usage() == KeptClipsUsage(clips=9, bytes=9 * per_clip, evicted_total=0,
                                                       budget_bytes=10 * per_clip)
    # c's 2nd and 3rd clips each cost a the oldest of its clips (a keeps the most); at c's 4th, a and c keep 4
    # each: a, opened first, loses its oldest.
    engine.step({"c": features[:4]})
    assert kept() == {"a": [4, 5, 6], "b": [1, 2, 3], "c": [1, 2, 3, 4]}
    assert engine.kept_clips_usage() == KeptClipsUsage(clips=10, bytes=10 * per_clip, evicted_total=3,
                                                       budget_bytes=10 * per_clip)
    for _ in range(6):  # every stream one clip a round: the budget holds, and evictions are counted
        sid_clips = {sid: [features[engine.kept_clip_indices(sid)[-1]]] for sid in "abc"}
        items = engine.step(sid_clips)
        usage = engine.kept_clips_usage()
        assert usage.bytes <= 10 * per_clip and usage.bytes == usage.clips * per_clip
        assert all(len(indices) >= config.top_k for indices in kept().values())
    assert engine.kept_clips_usage().evicted_total == 3 + 6 * 3
    assert sorted(len(indices) for indices in kept().values()) == [3, 3, 4]
    # a's trigger at its clip 12: retrieval and G over the clips a still keeps.
    trigger = next(item for item in items if isinstance(item, Trigger))
    assert set(trigger.retrieved) <= set(engine.kept_clip_indices("a"))
    assert trigger.bundle.global_memory.shape[0] == len(engine.kept_clip_indices("a"))
    for sid in "abc":
        engine.close(sid)
    assert engine.kept_clips_usage() == KeptClipsUsage(clips=0, bytes=0, evicted_total=21, budget_bytes=10 * per_clip)


def test_an_evicted_clips_raw_is_freed_at_once(modules):
    """The decision window keeps M and T of its clips, not raw: an evicted (or capped) clip's raw goes with it."""
    features = fake_features(modules, 6, seed=53)
    raws = [weakref.ref(clip.raw) for clip in features]
    per_clip = clip_bytes(features[0])
    engine = DecisionEngine(modules, DecisionConfig(max_kept_clips=5, top_k=1, kept_clips_budget_bytes=3 * per_clip),
                            force_respond=lambda sid, index: False)
    engine.open("s", "Q?")
    engine.step({"s": features})
    del features
    gc.collect()
    assert engine.kept_clip_indices("s") == [4, 5, 6]
    assert [raw() is not None for raw in raws] == [False, False, False, True, True, True]
    # The stream's bytes: its kept clips whole, M and T of its window's clips 1-3 (no longer kept), its KV cache.
    m_and_t = per_clip - raws[-1]().nbytes
    context = engine._streams["s"].context
    cache_and_tail = engine.cache_length("s") * engine.pool.bytes_per_token + context.tail.nbytes
    assert engine.memory_bytes("s") == 3 * per_clip + 3 * m_and_t + cache_and_tail


def test_the_per_stream_cap_alone_evicts_nothing_and_keeps_the_count(modules):
    features = fake_features(modules, 7, seed=55)
    engine = DecisionEngine(modules, DecisionConfig(max_kept_clips=3), force_respond=lambda sid, index: False)
    engine.open("s", "Q?")
    engine.step({"s": features[:2]})
    engine.step({"s": features[2:]})
    usage = engine.kept_clips_usage()
    assert engine.kept_clip_indices("s") == [5, 6, 7]
    assert usage == KeptClipsUsage(clips=3, bytes=3 * clip_bytes(features[0]), evicted_total=0, budget_bytes=None)


def test_a_budget_too_small_for_top_k_a_stream_is_exceeded_with_one_warning(modules, caplog):
    features = fake_features(modules, 6, seed=57)
    per_clip = clip_bytes(features[0])
    engine = DecisionEngine(modules, DecisionConfig(top_k=2, kept_clips_budget_bytes=3 * per_clip),
                            force_respond=lambda sid, index: index == 6 or False)
    for sid in "abc":
        engine.open(sid, "Q?")
    with caplog.at_level(logging.WARNING, logger="dispider.decision"):
        for clip in features:  # one clip a stream per step: over the budget from the 2nd step on
            items = engine.step({sid: [clip] for sid in "abc"})
    assert {sid: engine.kept_clip_indices(sid) for sid in "abc"} == {sid: [5, 6] for sid in "abc"}
    usage = engine.kept_clips_usage()
    assert usage.bytes == 6 * per_clip > usage.budget_bytes and usage.evicted_total == 3 * 4
    warnings = [r for r in caplog.records if r.name == "dispider.decision"]
    assert len(warnings) == 1 and "over their budget" in warnings[0].getMessage()
    assert all(len(item.retrieved) == 2 for item in items)  # every stream still retrieves top_k at its trigger
    for sid in "abc":
        engine.close(sid)
    assert engine.kept_clips_usage().bytes == 0
    with pytest.raises(ValueError, match="kept_clips_budget_bytes"):
        DecisionConfig(kept_clips_budget_bytes=0)
