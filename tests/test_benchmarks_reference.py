"""benchmarks/reference_bench.py on the CPU with tiny shapes: the report is well formed and the answers are full."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ANSWER_TOKENS = 4


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("reference_bench", ROOT / "benchmarks" / "reference_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_a_consistent_report(bench, tmp_path):
    out = tmp_path / "reference.json"
    assert bench.main(["--tiny", "--history", "1", "--rounds", "2", "--respond-every", "2", "--reactions", "2",
                       "--prompt-positions", "256", "--answer-tokens", str(ANSWER_TOKENS), "--ours-streams", "320",
                       "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["benchmark"] == "reference" and report["shapes"] == "tiny"
    assert report["config"] == {"history": 1, "rounds": 2, "respond_every": 2, "prompt_positions": 256,
                                "answer_tokens": ANSWER_TOKENS, "reactions": 2}
    pd, reaction, blocking = report["perception_decision"], report["reaction"], report["with_reaction"]
    assert reaction["new_tokens"] == ANSWER_TOKENS
    assert len(reaction["seconds_all"]) == 2 and min(reaction["seconds_all"]) > 0 and reaction["seconds_p50"] > 0
    for part in (pd, blocking):
        assert part["seconds_per_clip"] > 0 and part["clips_per_s"] > 0 and part["realtime_streams"] > 0
    assert blocking["seconds_per_clip"] == pytest.approx(pd["seconds_per_clip"] + reaction["seconds_p50"] / 2)
    assert blocking["realtime_streams"] == pytest.approx(16 / blocking["seconds_per_clip"])
    assert blocking["realtime_streams"] < pd["realtime_streams"]
    assert report["capacity_ratio"] == pytest.approx(320 / blocking["realtime_streams"])
    assert report["meets_target"] == (report["capacity_ratio"] >= 10)

    # --from-report: the same measurements, the ratio against a sweep that ran after them
    sweep = tmp_path / "streams.json"
    sweep.write_text(json.dumps({"benchmark": "load_streams", "sweep": {"max_realtime_streams": 96}}))
    again = tmp_path / "reference_with_sweep.json"
    assert bench.main(["--from-report", str(out), "--ours", str(sweep), "--out", str(again)]) == 0
    rerated = json.loads(again.read_text())
    assert rerated["with_reaction"] == blocking and rerated["ours"] == {"max_realtime_streams": 96, "source": str(sweep)}
    assert rerated["capacity_ratio"] == pytest.approx(96 / blocking["realtime_streams"])
    with pytest.raises(SystemExit, match="not a reference_bench.py report"):
        bench.main(["--from-report", str(sweep), "--ours-streams", "3", "--out", str(again)])


def test_min_new_tokens_outlasts_an_early_eos(bench):
    """Make the greedy first token the EOS: plain generate stops after it, the benchmark's answer does not."""
    torch.manual_seed(0)
    model = bench.build_reaction_model(bench.reaction_config(tiny=True), torch.device("cpu"), torch.float32)
    embeds = torch.randn(1, 32, model.config.hidden_size) * bench.INIT_STD
    first = int(bench.generate_answer(model, embeds, 1)[0, 0])
    model.config.eos_token_id = model.generation_config.eos_token_id = first
    with torch.inference_mode():
        stopped = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, 32, dtype=torch.long),
                                 max_new_tokens=ANSWER_TOKENS, do_sample=False, eos_token_id=first,
                                 pad_token_id=first)
    assert stopped.shape[1] == 1
    assert bench.generate_answer(model, embeds, ANSWER_TOKENS).shape[1] == ANSWER_TOKENS
