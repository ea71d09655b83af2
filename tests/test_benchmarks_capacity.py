"""benchmarks/capacity_bound.py: the one-GPU stream bound from the sidecar's and the reaction's ceilings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import capacity_bound  # noqa: E402


def write_inputs(tmp_path: Path, *, clips_per_s: float, answers_per_s: float, arrivals: str = "burst") -> list[str]:
    files = {
        "sidecar": {"device": "test GPU", "ours": {"clips_per_s": clips_per_s}},
        "reaction": {"config": {"arrivals": arrivals, "prompt_tokens": 4464, "max_tokens": 32},
                     "runs": [{"completed_per_s": answers_per_s / 2}, {"completed_per_s": answers_per_s}]},
        "reference": {"config": {"respond_every": 8}, "with_reaction": {"realtime_streams": 50.0}},
        "ours": {"sweep": {"max_realtime_streams": 200}},
    }
    args = []
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
        args += [f"--{name}", str(tmp_path / f"{name}.json")]
    return args


def test_the_bound_is_where_the_two_engines_shares_of_the_gpu_add_up_to_one(tmp_path):
    args = capacity_bound.build_parser().parse_args(write_inputs(tmp_path, clips_per_s=40.0, answers_per_s=5.0))
    report = capacity_bound.bound_report(args)
    n = report["bound_streams"]
    assert n / 16 / 40.0 + n / (16 * 8) / 5.0 == pytest.approx(1.0, abs=1e-3)
    assert report["sidecar_alone_streams"] == 640.0 and report["reaction_alone_streams"] == 640.0
    assert n == pytest.approx(320.0) and report["bound_ratio"] == pytest.approx(6.4)
    assert report["measured_streams"] == 200 and report["measured_share_of_bound"] == pytest.approx(0.625)
    # 10x = 500 streams: the answers take 500/640 of the GPU, the sidecar must do 31.25 clips/s in the rest.
    assert report["sidecar_clips_per_s_needed"] == pytest.approx(31.25 / (1 - 500 / 640), rel=1e-3)


def test_no_sidecar_is_fast_enough_when_the_answers_alone_overflow_the_gpu(tmp_path):
    args = capacity_bound.build_parser().parse_args(write_inputs(tmp_path, clips_per_s=100.0, answers_per_s=3.0))
    report = capacity_bound.bound_report(args)
    assert report["sidecar_clips_per_s_needed"] is None and report["sidecar_speedup_needed"] is None


def test_the_command_line_writes_json_and_refuses_a_non_burst_reaction_report(tmp_path):
    out = tmp_path / "bound.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/capacity_bound.py"),
                           *write_inputs(tmp_path, clips_per_s=40.0, answers_per_s=5.0), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["bound_streams"] == pytest.approx(320.0)
    assert "at most 320.0 streams" in done.stdout
    refused = subprocess.run([sys.executable, str(ROOT / "benchmarks/capacity_bound.py"),
                              *write_inputs(tmp_path, clips_per_s=40.0, answers_per_s=5.0, arrivals="poisson")],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--arrivals burst" in refused.stderr


def test_the_bound_of_another_sidecar_run_and_a_clear_error_for_a_run_the_report_lacks(tmp_path):
    inputs = write_inputs(tmp_path, clips_per_s=40.0, answers_per_s=5.0)
    sidecar = tmp_path / "sidecar.json"
    sidecar.write_text(json.dumps({"device": "test GPU", "ours": {"clips_per_s": 40.0},
                                   "ours_fp8": {"clips_per_s": 80.0}}))
    fp8 = capacity_bound.bound_report(capacity_bound.build_parser().parse_args([*inputs, "--sidecar-run", "ours_fp8"]))
    assert fp8["sidecar_clips_per_s"] == 80.0 and fp8["inputs"]["sidecar_run"] == "ours_fp8"
    assert fp8["bound_streams"] == pytest.approx(1 / (1 / (16 * 80.0) + 1 / (16 * 8 * 5.0)), abs=0.05)
    with pytest.raises(SystemExit, match="no run 'ours_unfused' .*runs: ours, ours_fp8"):
        capacity_bound.bound_report(capacity_bound.build_parser().parse_args([*inputs, "--sidecar-run", "ours_unfused"]))
