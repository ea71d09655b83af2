"""Plots of the live-stream sweep (and its baselines) for the docs.

    python benchmarks/plot_results.py --sweep benchmarks/results/streams_h200.json \\
        --baseline blocking=benchmarks/results/streams_blocking_h200.json \\
        --baseline "plain vLLM=benchmarks/results/plain_vllm_h200.json" --out-dir docs/img

Reads reports of ``benchmarks/load_streams.py`` (``"benchmark": "load_streams"``) and of
``benchmarks/plain_vllm_bench.py`` (``"benchmark": "plain_vllm"``), one system each, and writes:

- ``streams_latency_<tag>.png``: decision latency p50/p90/p99 (load-streams reports only) and time to first token
  p50/p99 against N streams, with the real-time bounds (p99 decision <= 2 s, p99 TTFT <= 1.5 s, or the sweep's own);
- ``streams_throughput_<tag>.png``: clips decided per second and answer tokens per second against N.

Colour = percentile, line style = system; a hollow marker is a run that was not real-time (load_streams.py's
verdict; for plain vLLM, p99 TTFT over its bound). Missing figures (null percentiles, no answers timed) are left out
of the lines, and an empty panel says so; a total of 0 tokens/s is a figure and is drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on the benchmark machines
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

CLIP_SECONDS = 16  # a 1-fps stream closes one clip every 16 s
DEFAULT_DECISION_BOUND_S = 2.0
DEFAULT_TTFT_BOUND_S = 1.5
LINE_STYLES = ["-", "--", "-.", ":"]
PERCENTILE_COLORS = {"p50": "tab:blue", "p90": "tab:orange", "p99": "tab:red"}
THROUGHPUT_COLORS = {"clips": "tab:green", "tokens": "tab:purple"}


# ---- reading reports --------------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One run (one N) of one system, in the units the plots use; None where the report has no figure."""

    streams: int
    decision: dict[str, float | None] = field(default_factory=dict)  # p50/p90/p99 seconds
    ttft: dict[str, float | None] = field(default_factory=dict)
    clips_per_s: float | None = None
    tokens_per_s: float | None = None
    realtime: bool | None = None


@dataclass
class Series:
    label: str
    kind: str  # "load_streams" or "plain_vllm"
    device: str | None
    points: list[Point]
    bounds: dict[str, float] = field(default_factory=dict)


def dig(data, *keys):
    """data[k1][k2]... or None where any level is missing or null."""
    for key in keys:
        if not isinstance(data, dict) or data.get(key) is None:
            return None
        data = data[key]
    return data


def percentiles(distribution: dict | None, names=("p50", "p90", "p99")) -> dict[str, float | None]:
    return {name: dig(distribution, name) for name in names}


def point_from_stream_run(run: dict, decision_source: str) -> Point:
    wall = dig(run, "wall_s")
    decided = dig(run, "decisions", "count")
    return Point(
        streams=run["streams"],
        decision=percentiles(dig(run, "decisions", f"latency_{decision_source}_s")),
        ttft=percentiles(dig(run, "responses", "ttft_s")),
        # Over the run's wall time, which includes the stagger at the start and the drain at the end.
        clips_per_s=decided / wall if decided and wall else None,
        tokens_per_s=dig(run, "responses", "tokens_per_s_total"),
        realtime=dig(run, "realtime", "ok"),
    )


def point_from_plain_run(run: dict) -> Point:
    return Point(
        streams=run["streams"],
        ttft=percentiles(dig(run, "ttft_s")),
        tokens_per_s=dig(run, "tokens_per_s_total"),
        realtime=dig(run, "within_ttft_bound"),
    )


def load_series(label: str, path: Path, decision_source: str) -> Series:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"plot_results: cannot read {path}: {error}") from None
    kind = report.get("benchmark", "load_streams")
    runs = [run for run in report.get("runs", []) if isinstance(run, dict) and "streams" in run]
    if kind == "plain_vllm":
        points = [point_from_plain_run(run) for run in runs]
        bounds = {"ttft": dig(report, "config", "max_p99_ttft_s")}
    elif kind == "load_streams":
        points = [point_from_stream_run(run, decision_source) for run in runs]
        bounds = {"decision": dig(report, "config", "max_p99_decision_s"), "ttft": dig(report, "config", "max_p99_ttft_s")}
    else:
        raise SystemExit(f"plot_results: {path}: unknown report kind {kind!r} (expected load_streams or plain_vllm)")
    points.sort(key=lambda p: p.streams)
    return Series(label, kind, report.get("device"), points, {k: v for k, v in bounds.items() if v is not None})


def parse_baseline(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {text!r}")
    return label, Path(path)


# ---- drawing --------------------------------------------------------------------------------------------------------------
def draw_line(ax, style: str, color: str, values: list[tuple[int, float | None, bool | None]],
              positive_only: bool = False) -> bool:
    """One line through the points that have a value; hollow markers where the run was not real-time."""
    kept = [(n, v, ok) for n, v, ok in values if v is not None and (v > 0 or not positive_only)]
    if not kept:
        return False
    ax.plot([n for n, _, _ in kept], [v for _, v, _ in kept], linestyle=style, color=color, linewidth=1.6)
    for n, v, ok in kept:
        ax.plot([n], [v], marker="o", markersize=6, color=color,
                markerfacecolor="white" if ok is False else color, linestyle="none", clip_on=False)
    return True


def draw_percentiles(ax, all_series: list[tuple[Series, str]], metric: str, names: tuple[str, ...]) -> bool:
    drawn = False
    for series, style in all_series:
        for name in names:
            values = [(p.streams, getattr(p, metric).get(name), p.realtime) for p in series.points]
            drawn |= draw_line(ax, style, PERCENTILE_COLORS[name], values, positive_only=True)  # log y axis
    return drawn


def draw_bound(ax, seconds: float, what: str) -> None:
    ax.axhline(seconds, color="black", linewidth=1.0, linestyle=(0, (2, 2)))
    ax.annotate(f"{what} bound {seconds:g} s", xy=(0.01, seconds), xycoords=("axes fraction", "data"),
                xytext=(0, 3), textcoords="offset points", fontsize=8)


def spaced_labels(stream_counts: list[int], min_share: float = 0.06) -> list[str]:
    """Labels of sorted N, blank where N is within ``min_share`` of the largest N of the last labelled one."""
    labels, last = [], None
    for n in stream_counts:
        if last is None or n - last >= min_share * stream_counts[-1]:
            labels.append(str(n))
            last = n
        else:
            labels.append("")
    return labels


def format_stream_axis(ax, stream_counts: list[int]) -> None:
    """Linear N axis from 0, ticked at the N that were run (sweeps bunch up near their largest real-time N); a label
    that would touch the previous one is left out."""
    ax.set_xticks(stream_counts)
    ax.set_xticklabels(spaced_labels(stream_counts))
    ax.minorticks_off()
    ax.set_xlabel("concurrent live streams N")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlim(left=0)
    ax.margins(x=0.04)  # keep the end markers off the frame


def say_empty(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, transform=ax.transAxes, ha="center", va="center", fontsize=9, color="gray", wrap=True)


def legend_handles(all_series: list[tuple[Series, str]], colors: dict[str, str]) -> list[Line2D]:
    """Colours and line styles explained once, not every (system, percentile) pair."""
    handles = [Line2D([], [], color=color, linewidth=2, label=name) for name, color in colors.items()]
    handles += [Line2D([], [], color="gray", linestyle=style, label=series.label) for series, style in all_series]
    handles.append(Line2D([], [], color="gray", marker="o", markerfacecolor="white", linestyle="none",
                          label="not real-time"))
    return handles


def stream_counts(all_series: list[tuple[Series, str]]) -> list[int]:
    return sorted({p.streams for series, _ in all_series for p in series.points})


def warn_other_devices(series: list[Series]) -> None:
    """The title names the main sweep's device; a baseline measured elsewhere is not comparable."""
    for other in series[1:]:
        if other.device and series[0].device and other.device != series[0].device:
            print(f"warning: {other.label!r} ran on {other.device}, the sweep on {series[0].device}", file=sys.stderr)


def title_for(main: Series) -> str:
    return f"Live streams on {main.device}" if main.device else "Live streams"


def plot_latency(all_series: list[tuple[Series, str]], out: Path, title: str) -> None:
    fig, (decision_ax, ttft_ax) = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    with_decisions = [(s, style) for s, style in all_series if s.kind == "load_streams"]
    main = all_series[0][0]
    if draw_percentiles(decision_ax, with_decisions, "decision", ("p50", "p90", "p99")):
        draw_bound(decision_ax, main.bounds.get("decision", DEFAULT_DECISION_BOUND_S), "p99")
        decision_ax.set_yscale("log")
    else:
        say_empty(decision_ax, "no decision latencies in these reports")
    decision_ax.set_title("decision latency (closing frame sent -> decision)", fontsize=10)
    decision_ax.set_ylabel("seconds")
    if draw_percentiles(ttft_ax, all_series, "ttft", ("p50", "p99")):
        draw_bound(ttft_ax, main.bounds.get("ttft", DEFAULT_TTFT_BOUND_S), "p99")
        ttft_ax.set_yscale("log")
    else:
        say_empty(ttft_ax, "no answers were timed in these reports\n(no time to first token)")
    ttft_ax.set_title("time to first token (trigger -> first answer token)", fontsize=10)
    ttft_ax.set_ylabel("seconds")
    for ax in (decision_ax, ttft_ax):
        format_stream_axis(ax, stream_counts(all_series))
    fig.legend(handles=legend_handles(all_series, PERCENTILE_COLORS), loc="lower center",
               ncol=len(PERCENTILE_COLORS) + len(all_series) + 1, fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=130)
    plt.close(fig)


def plot_throughput(all_series: list[tuple[Series, str]], out: Path, title: str) -> None:
    fig, (clips_ax, tokens_ax) = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    counts = stream_counts(all_series)
    drawn_clips = drawn_tokens = False
    for series, style in all_series:
        drawn_clips |= draw_line(clips_ax, style, THROUGHPUT_COLORS["clips"],
                                 [(p.streams, p.clips_per_s, p.realtime) for p in series.points])
        drawn_tokens |= draw_line(tokens_ax, style, THROUGHPUT_COLORS["tokens"],
                                  [(p.streams, p.tokens_per_s, p.realtime) for p in series.points])
    if drawn_clips:
        # What N streams at 1 fps close: a run keeping up sits just under it (its wall time adds stagger and drain).
        clips_ax.plot(counts, [n / CLIP_SECONDS for n in counts], color="gray", linewidth=1, linestyle=(0, (1, 2)),
                      label=f"N / {CLIP_SECONDS} s (clips closed at 1 fps)")
        clips_ax.legend(loc="upper left", fontsize=8, frameon=False)
    else:
        say_empty(clips_ax, "no decisions in these reports")
    if not drawn_tokens:
        say_empty(tokens_ax, "no answer tokens in these reports")
    elif not any(p.tokens_per_s for series, _ in all_series for p in series.points):
        say_empty(tokens_ax, "0 tokens/s in every run: the answers came back empty")
    clips_ax.set_title("clips decided per second (over each run's wall time)", fontsize=10)
    clips_ax.set_ylabel("clips / s")
    tokens_ax.set_title("answer tokens per second (all streams)", fontsize=10)
    tokens_ax.set_ylabel("tokens / s")
    for ax in (clips_ax, tokens_ax):
        format_stream_axis(ax, counts)
        ax.set_ylim(bottom=0)
    handles = legend_handles(all_series, {})
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(out, dpi=130)
    plt.close(fig)


# ---- driver ---------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/plot_results.py",
        description="PNG plots of a live-stream sweep (benchmarks/load_streams.py) and its baselines: decision "
                    "latency and time to first token against N, clips decided and answer tokens per second.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1] if __doc__ else None,
    )
    parser.add_argument("--sweep", type=Path, required=True, metavar="PATH",
                        help="the main sweep: a load_streams.py report (its device names the plots)")
    parser.add_argument("--label", default="dispider-vllm", help="the main sweep's name in the legend "
                                                                 "(default dispider-vllm)")
    parser.add_argument("--baseline", type=parse_baseline, action="append", default=[], metavar="LABEL=PATH",
                        help="another system: a load_streams.py report (e.g. blocking mode) or a "
                             "plain_vllm_bench.py report; repeatable (at most 3)")
    parser.add_argument("--decision-latency", choices=["client", "server"], default="client",
                        help="which decision latency to plot: the client's (closing frame sent -> decision event, "
                             "what the real-time bound judges; default) or the server's")
    parser.add_argument("--tag", default="h200", help="file name suffix: streams_latency_<tag>.png (default h200)")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/img"), help="where the PNGs go (default docs/img)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.baseline) >= len(LINE_STYLES):
        parser.error(f"at most {len(LINE_STYLES) - 1} baselines (one line style each)")
    series = [load_series(args.label, args.sweep, args.decision_latency)]
    series += [load_series(label, path, args.decision_latency) for label, path in args.baseline]
    warn_other_devices(series)
    styled = list(zip(series, LINE_STYLES))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    title = title_for(series[0])
    outputs = [args.out_dir / f"streams_latency_{args.tag}.png", args.out_dir / f"streams_throughput_{args.tag}.png"]
    plot_latency(styled, outputs[0], title)
    plot_throughput(styled, outputs[1], title)
    for out in outputs:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
