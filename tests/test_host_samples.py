"""benchmarks/host_samples.py: the summary of a sweep's GPU and host samples (nvidia-smi dmon, vmstat, top)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

DMON = """# gpu     sm    mem    enc    dec    jpg    ofa
# Idx      %      %      %      %      %      %
    0     20      2      0      0      0      0
    0    100      9      0      0      0      0
    0     60      5      0      0      0      0
"""
VMSTAT = """procs -----------memory---------- ---swap-- -----io---- -system-- -------cpu-------
 r  b   swpd   free   buff  cache   si   so    bi    bo   in   cs us sy id wa st gu
 9  0      0 100 10 10    0    0 1 1 1 1  1  1 98  0  0  0
 2  0      0 100 10 10    0    0 0 0 5 5 30  10 60  0  0  0
 3  0      0 100 10 10    0    0 0 0 5 5 20  6 74  0  0  0
"""
TOP_BLOCK = """top - 17:55:{s} up 3 min,  0 user,  load average: 3.00, 0.95, 0.35
Tasks: 207 total,   3 running, 204 sleeping,   0 stopped,   0 zombie

  PID USER      PR  NI    VIRT    RES    SHR S  %CPU  %MEM     TIME+ COMMAND
  888 root      20   0   54.0g   6.2g   1.3g R  {a}   4.9   2:26.07 python3
 1204 root      20   0  102.3g   1.8g 343444 S  {b}   1.4   0:55.71 VLLM::EngineCor
"""


def write_samples(folder: Path) -> Path:
    folder.mkdir()
    (folder / "dmon_mps.txt").write_text(DMON)
    (folder / "vmstat_mps.txt").write_text(VMSTAT)
    blocks = [TOP_BLOCK.format(s=10, a="1100", b="0.0"), TOP_BLOCK.format(s=20, a="240.0", b="30.0"),
              TOP_BLOCK.format(s=30, a="260.0", b="40.0"), TOP_BLOCK.format(s=40, a="250.0", b="20.0")]
    (folder / "top_mps.txt").write_text("\n".join(blocks))
    return folder


def test_the_summary_skips_what_covers_the_time_before_sampling(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import host_samples

    summary = host_samples.summarise(write_samples(tmp_path / "samples"))
    assert summary["gpu_sm_busy_percent"]["count"] == 3 and summary["gpu_sm_busy_percent"]["mean"] == pytest.approx(60)
    assert summary["host_cpu_percent"] == {"us": 25.0, "sy": 8.0, "id": 67.0, "seconds": 2}  # first line left out
    busiest = summary["busiest_processes"]
    assert [p["pid"] for p in busiest] == [888, 1204] and busiest[0]["command"] == "python3"
    assert busiest[0]["median_cpu_percent"] == 250.0 and busiest[0]["samples"] == 3  # top's first sample left out


def test_a_folder_without_samples_is_a_one_line_error(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/host_samples.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "no dmon*.txt in" in done.stderr and "Traceback" not in done.stderr
