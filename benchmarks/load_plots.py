"""The load report's two plots: latency against offered load, throughput against adapters.

matplotlib is optional (not a dependency of graft); without it the report skips the plots.
"""

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_all(sweep_list: Sequence[Any], out_dir: Path, slo_ms: float) -> list[str]:
    """Write the PNGs that the sweeps can fill; return their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    written = []
    path = out_dir / "latency_vs_load.png"
    if latency_vs_load(plt, sweep_list, path, slo_ms):
        written.append(str(path))
    path = out_dir / "throughput_vs_adapters.png"
    if throughput_vs_adapters(plt, sweep_list, path):
        written.append(str(path))
    return written


def latency_vs_load(plt: Any, sweep_list: Sequence[Any], path: Path, slo_ms: float) -> bool:
    """p50 (dashed) and p99 (solid) of answered requests against the offered rate."""
    if not sweep_list:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for s in sweep_list:
        rates = [p.offered_rps for p in s.points]
        p99 = [p.latency_ms["p99"] for p in s.points]
        p50 = [p.latency_ms["p50"] for p in s.points]
        (line,) = ax.plot(rates, p99, marker="o", label=f"{s.scenario} p99")
        ax.plot(rates, p50, linestyle="--", color=line.get_color(), alpha=0.6)
    ax.axhline(slo_ms, color="grey", linewidth=1, linestyle=":", label=f"SLO {slo_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency of answered requests (ms; dashed p50, solid p99)")
    ax.set_title("Latency vs offered load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def adapter_series(sweep_list: Sequence[Any]) -> dict[tuple[str, ...], dict[int, float]]:
    """Saturation sequences/s by distinct adapters, one series per target, corpus,
    popularity and arrival process (bursty traffic saturates elsewhere: as one series, its
    point replaced the Poisson one). A one-adapter sweep joins every popularity of its
    target, corpus and arrivals: with one adapter they agree."""
    series: dict[tuple[str, ...], dict[int, float]] = defaultdict(dict)
    for s in sweep_list:
        if s.target != "backbone" and s.num_adapters > 1:
            key = (s.target, s.corpus, s.popularity, _arrivals(s))
            series[key][s.num_adapters] = s.saturation_seq_s
    for s in sweep_list:
        if s.target != "backbone" and s.num_adapters == 1:
            for key, points in series.items():
                if (key[0], key[1], key[3]) == (s.target, s.corpus, _arrivals(s)):
                    points[1] = s.saturation_seq_s
    return series


def _arrivals(sweep: Any) -> str:
    return "poisson" if sweep.arrival == "poisson" else f"{sweep.arrival} cv {sweep.cv:g}"


def throughput_vs_adapters(plt: Any, sweep_list: Sequence[Any], path: Path) -> bool:
    """Saturation sequences/s against distinct adapters (`adapter_series`); the bare
    backbone as a dashed ceiling per corpus and arrival process."""
    series = adapter_series(sweep_list)
    ceilings = [s for s in sweep_list if s.target == "backbone"]
    if not any(len(points) > 1 for points in series.values()):
        return False
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    for (target, corpus, popularity, arrivals), points in sorted(series.items()):
        xs = sorted(points)
        label = f"{target} {corpus} {popularity}" + (
            "" if arrivals == "poisson" else f" {arrivals}"
        )
        ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
    for s in ceilings:
        ax.axhline(s.saturation_seq_s, linestyle="--", color="grey", linewidth=1)
        ax.annotate(
            f"bare backbone ({s.corpus}, {_arrivals(s)})", (1, s.saturation_seq_s), fontsize=7
        )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel("distinct adapters in the traffic")
    ax.set_ylabel("throughput at saturation (sequences/s)")
    ax.set_title("Throughput vs number of adapters")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
