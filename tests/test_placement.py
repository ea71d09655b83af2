"""Where the reaction LLM and the sidecar run: the placement rules, and the CLI refusing what the host lacks.

The two-GPU runs themselves (tensor parallelism, the sidecar on its own GPU) need GPUs; these check the decisions
that lead to them, on any host.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from serve.placement import PlacementError, plan_placement


def gpus(count: int, **options):
    return plan_placement(platform="cuda", gpu_count=count, cpu_count=16, **options)


def test_one_gpu_shares_it_and_leaves_the_sidecar_room():
    placement = gpus(1)
    assert placement.reaction_devices == ("cuda:0",) and placement.sidecar_device == "cuda:0"
    assert placement.sidecar_shares_gpu and placement.gpu_memory_utilization == 0.75
    assert placement.sidecar_threads == 4  # frame preprocessing only; the host's cores serve the others


def test_two_gpus_give_the_sidecar_its_own():
    placement = gpus(2)
    assert placement.reaction_devices == ("cuda:0",) and placement.sidecar_device == "cuda:1"
    assert not placement.sidecar_shares_gpu and placement.gpu_memory_utilization == 0.90


def test_tensor_parallel_over_both_gpus_puts_the_sidecar_beside_rank_0():
    placement = gpus(2, tensor_parallel_size=2)
    assert placement.tensor_parallel_size == 2 and placement.reaction_devices == ("cuda:0", "cuda:1")
    assert placement.sidecar_device == "cuda:0" and placement.sidecar_shares_gpu


def test_explicit_choices_win():
    placement = gpus(2, tensor_parallel_size=2, sidecar_device="cuda:1", gpu_memory_utilization=0.6,
                     sidecar_threads=8)
    assert placement.sidecar_device == "cuda:1" and placement.gpu_memory_utilization == 0.6
    assert placement.sidecar_threads == 8
    assert gpus(2, sidecar_device="cuda").sidecar_device == "cuda:0"
    assert gpus(1, sidecar_device="cpu").sidecar_device == "cpu" and not gpus(1, sidecar_device="cpu").sidecar_shares_gpu


@pytest.mark.parametrize(("options", "message"), [
    ({"tensor_parallel_size": 2}, "--tensor-parallel-size 2 needs 2 GPUs; 1 visible"),
    ({"sidecar_device": "cuda:1"}, "there are 1 visible GPUs"),
    ({"sidecar_device": "gpu1"}, "use auto, cpu, cuda or cuda:N"),
    ({"tensor_parallel_size": 0}, "must be at least 1"),
    ({"gpu_memory_utilization": 1.5}, "must be in (0, 1]"),
])
def test_impossible_placements_say_why(options, message):
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        gpus(1, **options)


def test_cpu_build_runs_both_on_the_cpu():
    placement = plan_placement(platform="cpu", gpu_count=0, cpu_count=2)
    assert placement.reaction_devices == ("cpu",) and placement.sidecar_device == "cpu"
    assert placement.sidecar_threads is None  # the CPU build uses the cores for the models themselves
    assert placement.gpu_memory_utilization == 0.75  # vLLM's CPU worker: its share of host memory
    with pytest.raises(PlacementError, match="vLLM runs on the CPU here"):
        plan_placement(platform="cpu", gpu_count=0, cpu_count=2, sidecar_device="cuda:1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU host")
def test_the_server_refuses_a_gpu_placement_on_this_cpu_host_before_loading_anything():
    """The real CLI: a clear usage error (exit 2), no traceback, and no model loaded."""
    done = subprocess.run([sys.executable, "-m", "serve", "--sidecar-device", "cuda:1", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "--sidecar-device cuda:1" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU host")
def test_fp8_for_the_reaction_is_refused_where_vllm_runs_on_the_cpu(default_checkpoint):
    done = subprocess.run([sys.executable, "-m", "serve", "--checkpoint", str(default_checkpoint.checkpoint_dir),
                           "--quantization", "fp8"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--quantization fp8 needs a GPU" in done.stderr, done.stderr


def test_the_reaction_prefills_an_answer_in_one_step_on_a_gpu_unless_told():
    from serve.app import GPU_MAX_NUM_BATCHED_TOKENS, reaction_batched_tokens

    assert reaction_batched_tokens(None, on_cpu=False) == GPU_MAX_NUM_BATCHED_TOKENS >= 4352 + 64
    assert reaction_batched_tokens(None, on_cpu=True) is None
    assert reaction_batched_tokens(512, on_cpu=False) == reaction_batched_tokens(512, on_cpu=True) == 512


def test_reaction_steps_wait_for_decisions_where_the_sidecar_shares_their_gpu_unless_told():
    from serve.app import SHARED_GPU_DECISION_GATE_MS, decision_gate_ms

    shared, own = gpus(1), gpus(2)
    cpu = plan_placement(platform="cpu", gpu_count=0, cpu_count=2)
    assert shared.sidecar_shares_gpu and not own.sidecar_shares_gpu
    assert decision_gate_ms(None, shared) == SHARED_GPU_DECISION_GATE_MS == 25
    assert decision_gate_ms(None, own) == decision_gate_ms(None, cpu) == 0
    assert decision_gate_ms(0, shared) == 0 and decision_gate_ms(10, own) == decision_gate_ms(10, cpu) == 10


def test_engine_and_sidecar_options_reach_the_processes_that_use_them(default_checkpoint, tmp_path):
    """--disable-custom-all-reduce (hosts where vLLM's CUDA-IPC all-reduce fails) reaches vLLM's engine arguments,
    --preprocess-workers, --preprocess-on, --sidecar-schedule and the others the sidecar's configuration."""
    from serve.app import make_backends
    from serve.cli import build_parser, config_from_args
    from serve.config import default_kept_clips_budget_bytes, host_memory_bytes, resolve_model_parts

    def backends(*flags: str):
        args = build_parser().parse_args(["--checkpoint", str(default_checkpoint.checkpoint_dir), *flags])
        config = config_from_args(args)
        return make_backends(config, resolve_model_parts(config))

    assert backends("--disable-custom-all-reduce").engine.engine_args().disable_custom_all_reduce
    default = backends()
    assert not default.engine.engine_args().disable_custom_all_reduce
    assert default.sidecar.config.preprocess_workers == 4
    assert backends("--preprocess-workers", "2").sidecar.config.preprocess_workers == 2
    assert default.sidecar.config.preprocess_on == "auto"
    assert backends("--preprocess-on", "device").sidecar.config.preprocess_on == "device"
    assert default.sidecar.config.frame_perception == "auto"
    assert backends("--frame-perception", "arrival").sidecar.config.frame_perception == "arrival"
    assert default.sidecar.config.kv_slots == 16 and default.sidecar.config.cuda_graphs
    assert default.sidecar.config.memory_share is None  # the CPU's sidecar shares no GPU with vLLM
    tuned = backends("--sidecar-kv-slots", "512", "--no-cuda-graphs").sidecar.config
    assert tuned.kv_slots == 512 and not tuned.cuda_graphs
    assert default.sidecar.config.schedule == "closes-first"
    assert backends("--sidecar-schedule", "together").sidecar.config.schedule == "together"
    assert default.sidecar.config.turn_log is None
    turn_log = str(tmp_path / "logs" / "turns.jsonl")
    assert backends("--sidecar-turn-log", turn_log).sidecar.config.turn_log == turn_log
    assert default.sidecar.config.quantization is None and default.engine.engine_args().quantization is None
    assert default.engine.engine_args().max_num_batched_tokens is None  # on the CPU vLLM picks (2048 here)
    assert backends("--max-num-batched-tokens", "512").engine.engine_args().max_num_batched_tokens == 512
    assert backends("--sidecar-quantization", "fp8").sidecar.config.quantization == "fp8"
    # The decision gate: none unless asked; asked, both processes get its name and vLLM the gated scheduler.
    assert default.decision_gate is None and default.engine.engine_args().scheduler_cls is None
    assert default.sidecar.config.decision_gate is None
    gated = backends("--decision-gate-ms", "25")
    try:
        assert gated.engine.engine_args().scheduler_cls == "dispider_vllm.reaction.scheduler.gated_scheduler"
        assert gated.sidecar.config.decision_gate == gated.engine.config.decision_gate == gated.decision_gate.name
        assert gated.engine.config.decision_gate_ms == 25
    finally:
        gated.decision_gate.close()
    # The kept clips: 32 a stream, and 40% of the host's memory for all streams, unless told otherwise.
    assert default.sidecar.config.max_kept_clips == 32
    assert default.sidecar.config.kept_clips_budget_bytes == default_kept_clips_budget_bytes()
    assert 0.39 * host_memory_bytes() < default_kept_clips_budget_bytes() <= 0.4 * host_memory_bytes()
    kept = backends("--max-kept-clips", "8", "--kept-clips-memory-gib", "1.5").sidecar.config
    assert (kept.max_kept_clips, kept.kept_clips_budget_bytes) == (8, 3 << 29)


@pytest.mark.parametrize(("flags", "message"), [(["--preprocess-workers", "-1"], "--preprocess-workers must be >= 0"),
                                               (["--sidecar-kv-slots", "0"], "--sidecar-kv-slots must be >= 1"),
                                               (["--max-kept-clips", "0"], "--max-kept-clips must be >= 1"),
                                               (["--max-num-batched-tokens", "0"],
                                                "--max-num-batched-tokens must be >= 1"),
                                               (["--capacity-streams", "0"], "--capacity-streams must be >= 1"),
                                               (["--max-num-batched-tokens", "64"],
                                                "--max-num-batched-tokens 64 is below the answers vLLM generates at "
                                                "once (128, --max-num-seqs)"),
                                               (["--max-num-batched-tokens", "64", "--max-num-seqs", "65"],
                                                "below the answers vLLM generates at once (65"),
                                               (["--respond-every", "0"], "--respond-every must be >= 1"),
                                               (["--keep-alive", "0"], "--keep-alive must be >= 1"),
                                               (["--switch-interval", "0"], "--switch-interval must be between"),
                                               (["--decision-gate-ms", "-1"], "--decision-gate-ms must be between 0"),
                                               (["--decision-gate-ms", "nan"], "--decision-gate-ms must be between 0"),
                                               (["--decision-gate-ms", "1001"], "and 1000 ms, not 1001"),
                                               (["--kept-clips-memory-gib", "0"], "--kept-clips-memory-gib must be > 0"),
                                               (["--kept-clips-memory-gib", "-2"], "must be > 0"),
                                               (["--sidecar-turn-log", "/"], "--sidecar-turn-log /: is a directory"),
                                               (["--sidecar-turn-log", "/proc/no/turns.jsonl"], "--sidecar-turn-log"),
                                               (["--sidecar-quantization", "int4"], "invalid choice: 'int4'"),
                                               (["--preprocess-on", "gpu"], "invalid choice: 'gpu'"),
                                               (["--frame-perception", "arrival", "--preprocess-on", "host"],
                                                "does not go with --preprocess-on host"),
                                               (["--frame-perception", "frame"], "invalid choice: 'frame'"),
                                               (["--http", "h2"], "invalid choice: 'h2'")])
def test_bad_sidecar_sizes_are_usage_errors(default_checkpoint, flags, message):
    result = subprocess.run([sys.executable, "-m", "serve", "--checkpoint", str(default_checkpoint.checkpoint_dir),
                             *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
