"""The static-shape (CUDA graph) paths against the eager ones.

On the CPU the padded passes run eagerly through the same code a GPU captures, so these tests check everything
but capture and replay: padding to buckets, the scratch slot, masks over the pool's whole capacity, token ids and
image starts in place of assembled embeddings, fallbacks to eager, and dropping graphs when the pool grows. The
last tests run only on a GPU and check the captured graphs themselves.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import Qwen2Config, Qwen2Model

from dispider_vllm.cuda_graphs import GraphCache, StaticShapes, cuda_graphs_enabled
from dispider_vllm.decision import CompactLM, DecisionConfig, DecisionEngine, KVPool
from dispider_vllm.perception.encoder import PerceptionEncoder
from dispider_vllm.perception.modules import PerceptionDecisionModules
from dispider_vllm.types import Clip, ClipFeatures, Trigger

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


# ---- the generic cache --------------------------------------------------------------------------------------
def test_buckets():
    shapes = StaticShapes(max_batch=6, length_multiple=32, max_length=256)
    assert [shapes.batch(n) for n in range(0, 8)] == [None, 1, 2, 4, 4, 6, 6, None]
    assert [shapes.length(n) for n in (0, 1, 32, 33, 256, 257)] == [None, 32, 32, 64, 256, None]
    assert StaticShapes(max_batch=0).batch(1) is None


def test_graph_cache_runs_eagerly_off_cuda_and_drops_graphs_when_a_bound_tensor_moves():
    cache = GraphCache("cpu")
    assert not cache.graphed
    pool = torch.zeros(4)
    cache.bind(pool)  # what the graphs will use but not own
    made = []
    allocate = lambda: made.append(1) or {"x": torch.zeros(3)}  # noqa: E731
    static = cache.inputs("a", allocate)
    assert cache.inputs("a", allocate) is static and len(made) == 1  # allocated once per key
    static["x"].copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert cache.run("a", lambda inputs: inputs["x"] * 2).tolist() == [2.0, 4.0, 6.0]
    assert cache.stats.eager_runs == 1 and cache.stats.captures == cache.stats.replays == 0

    cache.bind(pool)  # the same tensor: nothing dropped
    assert cache.inputs("a", allocate) is static and cache.stats.clears == 0
    cache.bind(torch.zeros(8))  # moved (and grown): every key starts over
    assert cache.stats.clears == 1
    assert cache.inputs("a", allocate) is not static and len(made) == 2
    cache.clear()
    assert cache.stats.clears == 2 and len(cache) == 0


def test_environment_variable_turns_the_static_paths_off(monkeypatch):
    modules = PerceptionDecisionModules.random(seed=0)
    assert cuda_graphs_enabled() and CompactLM(modules.language_model).decision_bucket(1, 10, 0) is not None
    monkeypatch.setenv("DISPIDER_CUDA_GRAPHS", "0")
    assert not cuda_graphs_enabled()
    lm = CompactLM(modules.language_model)
    assert not lm.cuda_graphs and lm.decision_bucket(1, 10, 0) is None
    encoder = PerceptionEncoder(modules)
    assert not encoder.cuda_graphs and encoder.graph_shapes.batch(1) is None
    engine = DecisionEngine(modules)
    assert not engine.lm.cuda_graphs


# ---- decision: the padded cached forward ----------------------------------------------------------------------
def grouped_qwen(seed: int = 0) -> Qwen2Model:
    """Four query heads over two KV heads (GQA folding), peaky random weights."""
    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, initializer_range=0.1, rope_theta=1e6)
    return Qwen2Model(config).eval()


@dataclass
class CachedStep:
    streams: list[int]  # positions in the list of allocated slots
    lengths: list[int]
    keep: list[int]
    static: bool  # whether the padded path should take it (max batch 4, max length 64 below)


def committed(pool: KVPool, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = pool.length(slot)
    return pool.k[:, slot, :length].clone(), pool.v[:, slot, :length].clone()


def test_padded_decision_forward_matches_eager_over_steps():
    model = grouped_qwen()
    eager = CompactLM(model, cuda_graphs=False)
    padded = CompactLM(model, max_graph_batch=4, max_graph_length=64)
    assert eager.decision_bucket(1, 10, 0) is None
    pools = {"eager": eager.new_pool(slots=2, capacity=16), "padded": padded.new_pool(slots=2, capacity=16)}
    for pool in pools.values():  # the same slot numbers in both; the 5th freed, so slots are not consecutive
        allocated = [pool.allocate() for _ in range(6)]
        pool.release(allocated[4])
    assert pools["eager"].free == pools["padded"].free
    generator = torch.Generator().manual_seed(1)
    steps = [
        CachedStep([0, 1, 2, 3], [5, 9, 3, 12], [5, 9, 3, 12], static=True),  # fills prefixes; pool grows
        CachedStep([3, 1], [7, 30], [2, 0], static=True),  # evaluate without keeping (1), keep part (3)
        CachedStep([2, 0, 5], [33, 1, 10], [33, 1, 4], static=True),  # 3 rows in a bucket of 4, length 64
        CachedStep([5], [70], [70], static=False),  # too long a suffix: eager
        CachedStep([0, 1, 2, 3, 5], [4, 4, 4, 4, 4], [1, 0, 2, 0, 4], static=False),  # too many rows: eager
        CachedStep([5, 0], [20, 3], [20, 3], static=True),  # after the eager steps, different prefix lengths
    ]
    for index, step in enumerate(steps):
        if index == 5:
            for pool in pools.values():
                pool.truncate(allocated[1], 3)
        slots = [allocated[i] for i in step.streams]
        suffixes = [torch.randn(n, 128, generator=generator) for n in step.lengths]
        runs_before = padded.graphs.stats.eager_runs
        bucket = padded.decision_bucket(len(slots), max(step.lengths), max(pools["padded"].length(s) for s in slots))
        want = eager.forward_cached(pools["eager"], slots, suffixes, step.keep)
        got = padded.forward_cached(pools["padded"], slots, suffixes, step.keep)
        assert (padded.graphs.stats.eager_runs - runs_before == 1) == step.static, f"step {index}"
        if step.static:  # the pass leaves its static inputs intact: a graph's warm-up runs and replays reuse them
            static = padded.graphs.inputs(bucket, allocate=None)
            for row, suffix in enumerate(suffixes):
                assert torch.equal(static["embeds"][row, : len(suffix)], suffix)
        assert got.shape == want.shape
        for row, n in enumerate(step.lengths):
            torch.testing.assert_close(got[row, :n], want[row, :n], atol=ATOL, rtol=0)
        for slot in (allocated[i] for i in (0, 1, 2, 3, 5)):
            assert pools["padded"].length(slot) == pools["eager"].length(slot)
            for got_kv, want_kv in zip(committed(pools["padded"], slot), committed(pools["eager"], slot)):
                torch.testing.assert_close(got_kv, want_kv, atol=ATOL, rtol=0)
    assert padded.graphs.stats.eager_runs == 4


def test_padded_rows_touch_no_other_slot_and_the_scratch_slot_is_never_handed_out():
    model = grouped_qwen(seed=2)
    lm = CompactLM(model, max_graph_batch=8)
    pool = lm.new_pool(slots=4, capacity=256)  # exactly the streams below: the scratch slot is extra
    slots = [pool.allocate() for _ in range(4)]
    generator = torch.Generator().manual_seed(3)
    lm.forward_cached(pool, slots, [torch.randn(n, 128, generator=generator) for n in (40, 17, 25, 8)],
                      [40, 17, 25, 8])
    scratch = pool.scratch_slot()
    assert scratch not in slots and scratch not in pool.free
    bystander = slots[1]
    before_k, before_v = pool.k[:, bystander].clone(), pool.v[:, bystander].clone()
    prefixes = {s: committed(pool, s) for s in slots}
    # Three rows in the bucket of four (and 64 tokens) of the call before: the padded row, stale input from that
    # call, writes the scratch slot.
    batch = [slots[3], slots[0], slots[2]]
    lm.forward_cached(pool, batch, [torch.randn(n, 128, generator=generator) for n in (9, 45, 2)], [0, 0, 0])
    assert torch.equal(pool.k[:, bystander], before_k) and torch.equal(pool.v[:, bystander], before_v)
    for slot in batch:  # the committed prefixes of the batch's own rows are untouched too
        got_k, got_v = committed(pool, slot)
        assert torch.equal(got_k, prefixes[slot][0]) and torch.equal(got_v, prefixes[slot][1])
    assert pool.k[:, scratch].abs().sum() > 0  # the padded rows did write there
    assert pool.num_slots == 4 and not pool.free  # ...and the pool did not grow for them
    assert scratch not in [pool.allocate() for _ in range(6)]  # grows the pool; still never handed out
    assert pool.scratch_slot() == scratch and pool.num_slots == 16


def test_pool_growth_drops_the_graphs_and_results_stay_equal():
    model = grouped_qwen(seed=4)
    eager, padded = CompactLM(model, cuda_graphs=False), CompactLM(model)
    pools = [lm.new_pool(slots=2, capacity=64, growth_multiple=64) for lm in (eager, padded)]
    slot = [pool.allocate() for pool in pools][0]
    generator = torch.Generator().manual_seed(5)
    clears = []
    for length in (30, 30, 30, 30, 30):  # the prefix outgrows the capacity: the pool's tensors move
        suffix = torch.randn(length, 128, generator=generator)
        want = eager.forward_cached(pools[0], [slot], [suffix], [length])
        got = padded.forward_cached(pools[1], [slot], [suffix], [length])
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        clears.append(padded.graphs.stats.clears)
    assert pools[1].capacity > 64
    assert clears[0] == 0 and clears[-1] >= 2  # bound on first use; dropped at each growth since


# ---- decision engine ------------------------------------------------------------------------------------------
def fake_features(modules: PerceptionDecisionModules, count: int, seed: int) -> list[ClipFeatures]:
    generator = torch.Generator().manual_seed(seed)
    device = modules.device
    return [ClipFeatures(index=i + 1, start=16.0 * i, end=16.0 * (i + 1), raw=torch.randn(4, modules.raw_dim),
                         memory=torch.randn(64, modules.hidden_size, generator=generator).to(device),
                         indicator=torch.randn(modules.hidden_size, generator=generator).to(device))
            for i in range(count)]


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_decision_engine_with_and_without_graphs_decides_alike(device):
    """Triggers (summaries, truncation), window rebuilds and rounds of 3 (eager) and fewer streams (padded)."""
    modules = PerceptionDecisionModules.random(seed=6, device=device)
    features = {sid: fake_features(modules, 6, seed) for seed, sid in enumerate("abc")}
    triggers = {"a": {2, 5}, "b": {4}, "c": set()}
    config = dict(max_context_clips=3, max_kept_clips=4)
    engines = [DecisionEngine(modules, DecisionConfig(cuda_graphs=graphs, max_graph_batch=2, **config),
                              force_respond=lambda sid, index: index in triggers[sid]) for graphs in (False, True)]
    # Clip positions per stream per step: rounds of 3 streams run eagerly (max_graph_batch=2), smaller ones padded.
    schedule = [dict(a=[0, 1], b=[0]), dict(a=[2], b=[1, 2], c=[0, 1, 2]), dict(a=[3, 4, 5], b=[3, 4, 5], c=[3])]
    outcomes = []
    for engine in engines:
        for sid in features:
            engine.open(sid, f"What does stream {sid} show?")
        items = []
        for step in schedule:
            items += engine.step({sid: [features[sid][i] for i in positions] for sid, positions in step.items()})
        outcomes.append(items)
    stats = engines[1].lm.graphs.stats
    assert (stats.replays if device == "cuda" else stats.eager_runs) > 0
    assert [type(i) for i in outcomes[0]] == [type(i) for i in outcomes[1]]
    assert any(isinstance(i, Trigger) for i in outcomes[1])
    for want, got in zip(*outcomes):
        want_event = want.event if isinstance(want, Trigger) else want
        got_event = got.event if isinstance(got, Trigger) else got
        assert (got_event.stream_id, got_event.clip_index) == (want_event.stream_id, want_event.clip_index)
        assert got_event.logit == pytest.approx(want_event.logit, abs=1e-4)


# ---- perception -----------------------------------------------------------------------------------------------
def make_clips(starts: list[float], seed: int) -> list[Clip]:
    generator = torch.Generator().manual_seed(seed)
    return [Clip(index=i + 1, start=start, end=start + 16.0, pixels=torch.randn(16, 3, 224, 224, generator=generator))
            for i, start in enumerate(starts)]


def test_padded_perception_matches_eager_encode():
    modules = PerceptionDecisionModules.random(seed=7)
    eager = PerceptionEncoder(modules, cuda_graphs=False)
    padded = PerceptionEncoder(modules, max_clips_per_pass=3, max_graph_clips=4)
    # Time prompts of different lengths (1, 3 and 4 digits), a batch of 3 in a bucket of 4, then fewer clips
    # (stale rows from the batch before in the padding), then 5 clips: a chunk of 3 and one of 2, both padded.
    batches = [make_clips([0.0, 96.4, 1904.6], seed=1), make_clips([32.0], seed=2),
               make_clips([16.0 * i for i in range(5)], seed=3)]
    for clips in batches:
        want, got = eager.encode(clips), padded.encode(clips)
        assert [f.index for f in got] == [c.index for c in clips]
        for a, b in zip(got, want):
            for name in ("raw", "memory", "indicator"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=ATOL, rtol=0)
            assert a.raw.device.type == "cpu" and a.memory.shape == (64, modules.hidden_size)
    assert padded.graphs.stats.eager_runs == 4
    assert padded.perception_bucket(make_clips([0.0] * 5, seed=4), [([1], [])] * 5) is None  # too many: eager


def test_perception_falls_back_to_eager_beyond_the_graph_batch():
    modules = PerceptionDecisionModules.random(seed=8)
    encoder = PerceptionEncoder(modules, max_graph_clips=2)
    clips = make_clips([0.0, 16.0, 32.0], seed=5)
    features = encoder.encode(clips)
    assert encoder.graphs.stats.eager_runs == 0 and len(features) == 3
    want = PerceptionEncoder(modules, cuda_graphs=False).encode(clips)
    torch.testing.assert_close(features[2].memory, want[2].memory, atol=ATOL, rtol=0)


# ---- the benchmarks, tiny -------------------------------------------------------------------------------------
def load_bench(name: str):
    """benchmarks/NAME.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    return bench


def tiny_report(name: str, tmp_path, *flags: str) -> dict:
    """Run benchmarks/NAME.py --tiny with these flags; its exit status must be 0; its JSON report."""
    out = tmp_path / f"{name}.json"
    assert load_bench(name).main(["--tiny", "--reps", "2", "--warmup", "1", *flags, "--out", str(out)]) == 0
    return json.loads(out.read_text())


def test_graph_bench_tiny_writes_a_well_formed_report(tmp_path):
    report = tiny_report("graph_bench", tmp_path, "--sizes", "1,2", "--check-sizes", "1,2", "--history-clips", "2")
    assert report["benchmark"] == "cuda_graphs" and report["shapes"] == "tiny"
    assert {"name", "torch", "vllm"} <= set(report["device"])
    assert report["errors"] == []
    checks = report["correctness"]
    assert [c["batch"] for c in checks] == [1, 2]
    for check in checks:
        assert check["ok"], check
        for part in ("decision_hidden", "decision_logits", "perception_memory", "perception_indicator"):
            assert check[part]["ok"] and 0 <= check[part]["max_abs_diff"] <= check[part]["allowed"]
    timings = report["timings"]
    assert [t["clips"] for t in timings] == [1, 2]
    for timing in timings:
        for mode in ("eager", "graphs"):
            assert set(timing[mode]) == {"perceive_ms", "decide_ms", "step_ms"}
            assert all(value > 0 for value in timing[mode].values())
        assert timing["speedup"]["step"] > 0


def test_frame_perception_bench_tiny_writes_a_well_formed_report(tmp_path):
    """benchmarks/frame_perception_bench.py --tiny: the three ways agree, every close and frame pass is timed."""
    report = tiny_report("frame_perception_bench", tmp_path, "--sizes", "1,2", "--check-sizes", "1,2",
                         "--frame-batches", "1,4")
    assert report["benchmark"] == "frame_perception" and report["ok"] and report["errors"] == []
    assert [c["clips"] for c in report["correctness"]] == [1, 2]
    for check in report["correctness"]:
        assert check["ok"] and set(check) == {"clips", "arrival", "prefill", "ok"}
        for way in ("arrival", "prefill"):
            assert all(check[way][n]["max_abs_diff"] < 1e-4 < check[way][n]["scale"] for n in ("raw", "memory"))
    assert [c["clips"] for c in report["close"]] == [1, 2]
    for close in report["close"]:
        assert all(close["close_ms"][way] > 0 for way in ("clip", "arrival", "prefill"))
        assert close["ratio_clip_over_arrival"] == close["close_ms"]["clip"] / close["close_ms"]["arrival"]
        assert close["ratio_arrival_over_prefill"] == close["close_ms"]["arrival"] / close["close_ms"]["prefill"]
    assert [(p["frames"], p["pass_ms"] > 0, p["pass_with_prefill_ms"] > 0) for p in report["frame_passes"]] == [
        (1, True, True), (4, True, True)]


# ---- on a GPU: capture and replay -----------------------------------------------------------------------------
@cuda_only
def test_captured_decision_graphs_replay_like_eager():
    model = grouped_qwen(seed=9).cuda()
    eager, graphed = CompactLM(model, cuda_graphs=False), CompactLM(model)
    pools = [lm.new_pool(slots=4, capacity=128) for lm in (eager, graphed)]
    slots = [[pool.allocate() for _ in range(3)] for pool in pools][0]
    generator = torch.Generator().manual_seed(10)
    for step in range(6):  # several replays of the same graphs with new inputs, and a growth of the pool
        order = [slots[(step + i) % 3] for i in range(1 + step % 3)]
        suffixes = [torch.randn(10 + 7 * i, 128, generator=generator).cuda() for i in range(len(order))]
        keep = [len(s) for s in suffixes]
        want = eager.forward_cached(pools[0], order, suffixes, keep)
        got = graphed.forward_cached(pools[1], order, suffixes, keep)
        torch.testing.assert_close(got, want, atol=1e-3, rtol=0)
    assert graphed.graphs.stats.captures >= 3 and graphed.graphs.stats.replays == 6


@cuda_only
def test_captured_perception_graphs_replay_like_eager(monkeypatch):
    # TF32 convolutions only in some of cuDNN's algorithms, chosen by batch size, would differ by ~1e-3 on their own.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    modules = PerceptionDecisionModules.random(seed=11, device="cuda")
    eager, graphed = PerceptionEncoder(modules, cuda_graphs=False), PerceptionEncoder(modules)
    for seed, starts in enumerate([[0.0], [16.0, 1904.6], [32.0], [48.0, 64.0, 80.0]]):
        clips = make_clips(starts, seed=seed)
        for a, b in zip(graphed.encode(clips), eager.encode(clips)):
            for name in ("raw", "memory", "indicator"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-3, rtol=0)
    assert graphed.graphs.stats.captures >= 3 and graphed.graphs.stats.replays == 4


def test_capturing_every_decision_bucket_at_start_borrows_slots_and_commits_nothing():
    """The start-up warm-up runs one padded pass per (rows, suffix length) bucket on borrowed slots: the streams
    decide afterwards exactly as without it, and the pool has every slot back, empty."""
    modules = PerceptionDecisionModules.random(seed=0)
    clips = [ClipFeatures(i, 16.0 * i, 16.0 * (i + 1), torch.zeros(1), torch.randn(64, modules.hidden_size) * 0.1,
                          torch.randn(modules.hidden_size) * 0.1) for i in range(3)]

    def decide(warm: bool) -> list[float]:
        engine = DecisionEngine(modules, DecisionConfig(max_graph_batch=4, initial_kv_slots=2))
        engine.open("a", "What happens?")
        if warm:
            cached = engine.cache_length("a")
            assert engine.capture_graphs() == 0  # nothing to capture on the CPU
            assert engine.capture_graphs(without_graphs=True) == 0
            shapes = engine.lm.graph_shapes
            assert engine.lm.graphs.stats.eager_runs == len(shapes.batch_buckets()) * len(shapes.length_buckets())
            assert engine.pool.num_slots >= 4 and len(engine.pool.free) == engine.pool.num_slots - 1  # all back
            assert all(engine.pool.length(slot) == 0 for slot in engine.pool.free) and engine.cache_length("a") == cached
        engine.open("b", "What happens?")
        events = engine.step({"a": clips, "b": clips[:2]})
        return [round((e.event if isinstance(e, Trigger) else e).logit, 5) for e in events]

    assert decide(warm=True) == decide(warm=False)


@cuda_only
def test_after_capturing_at_start_no_live_step_captures():
    import numpy as np

    from dispider_vllm.checkpoint.random import ensure_default_checkpoint
    from dispider_vllm.perception.frames import load_preprocessor_config
    from dispider_vllm.sidecar.engine import SidecarEngine
    from dispider_vllm.sidecar.protocol import OpenStream, PushFrames
    from dispider_vllm.types import Frame

    part_dir = Path(ensure_default_checkpoint().split.perception_decision_dir)
    modules = PerceptionDecisionModules.load(part_dir, device="cuda", dtype=torch.bfloat16)
    engine = SidecarEngine(modules, preprocessor=load_preprocessor_config(part_dir / "vision_tower"),
                           decision_config=DecisionConfig(max_graph_batch=4, initial_kv_slots=8))
    captured = engine.capture_graphs()
    assert captured["perception"] > 0 and captured["decision"] > 0
    before = (engine.encoder.graphs.stats.captures, engine.decision.lm.graphs.stats.captures)
    frames = tuple(Frame(t + 0.5, np.full((64, 64, 3), t * 7 % 255, dtype=np.uint8)) for t in range(16))
    for stream in ("a", "b"):
        engine.handle(OpenStream(stream, "What happens?"))
        engine.handle(PushFrames(stream, frames, end_of_stream=True))
    while engine.has_work():
        engine.step()
    assert (engine.encoder.graphs.stats.captures, engine.decision.lm.graphs.stats.captures) == before
    assert engine.encoder.graphs.stats.replays > 0 and engine.decision.lm.graphs.stats.replays > 0
