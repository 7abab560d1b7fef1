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


def throughput_vs_adapters(plt: Any, sweep_list: Sequence[Any], path: Path) -> bool:
    """Saturation sequences/s against distinct adapters, one line per target, corpus and
    popularity (a one-adapter sweep joins every popularity: with one adapter they agree);
    the bare backbone as a dashed ceiling per corpus."""
    series: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for s in sweep_list:
        if s.target != "backbone" and s.num_adapters > 1:
            series[(s.target, s.corpus, s.popularity)][s.num_adapters] = s.saturation_seq_s
    for s in sweep_list:
        if s.target != "backbone" and s.num_adapters == 1:
            for key, points in series.items():
                if key[:2] == (s.target, s.corpus):
                    points[1] = s.saturation_seq_s
    ceilings = [s for s in sweep_list if s.target == "backbone"]
    if not any(len(points) > 1 for points in series.values()):
        return False
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    for (target, corpus, popularity), points in sorted(series.items()):
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=f"{target} {corpus} {popularity}")
    for s in ceilings:
        ax.axhline(s.saturation_seq_s, linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"bare backbone ({s.corpus})", (1, s.saturation_seq_s), fontsize=7)
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
