"""Summarise the GPU's and the host's use sampled during a sweep (``h200_all.sh`` with ``SAMPLE_HOST=1``).

    python benchmarks/host_samples.py benchmarks/results/samples_576_workers8_mps_h200 \\
        --out benchmarks/results/samples_576_workers8_mps_h200/summary.json

The folder holds what the mps step wrote: ``dmon*.txt`` (``nvidia-smi dmon -s u``: SM busy % a second),
``vmstat*.txt`` (``vmstat 1``: the host's CPU split a second) and ``top*.txt`` (``top -b -d 10``: each process's
%CPU every 10 s, 100% being one core). Reported: SM busy (count, mean, p50/p90/p99), the host's CPU user /
system / idle (means), and the processes with the most CPU (median %CPU over the samples). The first vmstat line
and the first top sample cover the time before sampling began, so both are left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load_streams import distribution  # noqa: E402


def sm_busy(text: str) -> list[float]:
    """The ``sm`` column of ``nvidia-smi dmon -s u`` (every GPU's rows; '-' where the driver had no value)."""
    values = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 1 and not line.lstrip().startswith("#") and fields[1].isdigit():
            values.append(float(fields[1]))
    return values


def cpu_split(text: str) -> dict:
    """Means of vmstat's us / sy / id columns, without the first line (averages since boot)."""
    header, rows = None, []
    for line in text.splitlines():
        fields = line.split()
        if "us" in fields and "id" in fields:
            header = fields
        elif header and fields and fields[0].isdigit():
            rows.append(fields)
    rows = rows[1:]
    if not header or not rows:
        raise SystemExit("host_samples: no vmstat lines to read")
    return {name: round(statistics.fmean(float(row[header.index(name)]) for row in rows), 1)
            for name in ("us", "sy", "id")} | {"seconds": len(rows)}


def busiest_processes(text: str, top: int = 5) -> list[dict]:
    """Per process: the median %CPU over top's samples after its first, its command and last resident size."""
    samples: dict[str, list[float]] = {}
    about: dict[str, dict] = {}
    blocks = text.split("\ntop - ")[1:]  # the first block (before the first separator) measures since start-up
    for block in blocks:
        header = None
        for line in block.splitlines():
            fields = line.split()
            if fields[:1] == ["PID"]:
                header = fields
            elif header and fields and fields[0].isdigit() and len(fields) >= len(header):
                pid = fields[0]
                samples.setdefault(pid, []).append(float(fields[header.index("%CPU")]))
                about[pid] = {"command": " ".join(fields[len(header) - 1 :]), "res": fields[header.index("RES")]}
    ranked = sorted(samples, key=lambda pid: statistics.median(samples[pid]), reverse=True)[:top]
    return [{"pid": int(pid), **about[pid], "median_cpu_percent": statistics.median(samples[pid]),
             "samples": len(samples[pid])} for pid in ranked]


def summarise(folder: Path) -> dict:
    def one(pattern: str) -> str:
        found = sorted(folder.glob(pattern))
        if not found:
            raise SystemExit(f"host_samples: no {pattern} in {folder}")
        return found[0].read_text()

    return {"folder": str(folder), "gpu_sm_busy_percent": distribution(sm_busy(one("dmon*.txt"))),
            "host_cpu_percent": cpu_split(one("vmstat*.txt")), "busiest_processes": busiest_processes(one("top*.txt"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/host_samples.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a folder with dmon*.txt, vmstat*.txt and top*.txt")
    parser.add_argument("--out", type=Path, help="write the summary as JSON here")
    args = parser.parse_args(argv)
    summary = summarise(args.folder)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
