"""The mixed-batch benchmark's results: one ``Result`` per method and scenario, tables, a plot.

Split out of ``benchmarks.mixed_batch`` so that what is printed and plotted lives apart from
how it is measured: ``summary`` sets the best graft kernel of each scenario against the base
model, PEFT and the merged models, and ``results_table``, ``summary_table`` and ``plot`` show
the results (``plot`` draws nothing without matplotlib).
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.mixed_batch_contenders import METHODS, MIXED_RANKS, UNIFORM_RANKS, Scenario


@dataclass(frozen=True, slots=True)
class Result:
    scenario: Scenario
    method: str  # one of METHODS
    seq_per_s: float  # rows per second at the median step time
    timing: common.Timing
    vs_base: float | None  # seq_per_s over base's, same scenario
    vs_peft: float | None  # seq_per_s over peft's, same scenario
    max_abs_diff: float | None  # max |probability difference| from the reference method

    def as_json(self) -> dict[str, Any]:
        fields = {k: getattr(self, k) for k in ("method", "seq_per_s", "vs_base", "vs_peft")}
        extra = {"max_abs_diff": self.max_abs_diff, **self.timing.as_json()}
        return {**asdict(self.scenario), **fields, **extra}


def summary(results: Sequence[Result]) -> list[dict[str, Any]]:
    """Per scenario, the best graft kernel against the base model (b/a), PEFT (b/c), merged."""
    by_scenario: dict[Scenario, dict[str, Result]] = {}
    for r in results:
        by_scenario.setdefault(r.scenario, {})[r.method] = r
    rows = []
    for scenario, found in by_scenario.items():
        grafts = [r for m, r in found.items() if m.startswith("graft-")]
        best = max(grafts, key=lambda r: r.seq_per_s, default=None)
        merged = found.get("merged")
        rows.append(
            {
                **asdict(scenario),
                "best_kernel": best.method.removeprefix("graft-") if best else None,
                "graft_seq_per_s": best.seq_per_s if best else None,
                "graft_vs_base": best.vs_base if best else None,
                "graft_vs_peft": best.vs_peft if best else None,
                "graft_vs_merged": common.ratio(
                    best.seq_per_s if best else None, merged.seq_per_s if merged else None
                ),
            }
        )
    return rows


def results_table(results: Sequence[Result]) -> str:
    headers = ("configuration", "method", "seq/s", "best", "vs base", "vs PEFT", "max|dp|")
    rows = [
        (
            r.scenario.label,
            r.method,
            f"{r.seq_per_s:.1f}",
            f"{r.scenario.batch / r.timing.min_s:.1f}",
            common.fmt_ratio(r.vs_base),
            common.fmt_ratio(r.vs_peft),
            "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}",
        )
        for r in results
    ]
    return common.format_table(headers, rows)


def summary_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ("configuration", "best kernel", "seq/s", "b/a base", "b/c PEFT", "b/d merged")
    cells = [
        (
            Scenario(r["batch"], r["seq_tokens"], r["num_adapters"], r["ranks"]).label,
            r["best_kernel"] or "-",
            "-" if r["graft_seq_per_s"] is None else f"{r['graft_seq_per_s']:.1f}",
            common.fmt_ratio(r["graft_vs_base"]),
            common.fmt_ratio(r["graft_vs_peft"]),
            common.fmt_ratio(r["graft_vs_merged"]),
        )
        for r in rows
    ]
    return common.format_table(headers, cells)


def plot(results: Sequence[Result], batch: int, seq: int, path: Path) -> bool:
    """Throughput against distinct adapters at the headline shape; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [r for r in results if (r.scenario.batch, r.scenario.seq_tokens) == (batch, seq)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(m for m in METHODS if any(r.method == m for r in shown)):
        color, style = f"C{i}", "--" if method == "base" else "-"
        for ranks, marker, fill, line in (
            (UNIFORM_RANKS, "o", "full", style),
            (MIXED_RANKS, "D", "none", "none"),
        ):
            points = sorted(
                (r.scenario.num_adapters, r.seq_per_s)
                for r in shown
                if r.method == method and r.scenario.ranks == ranks
            )
            if points:
                label = method if ranks == UNIFORM_RANKS else None
                xs, ys = zip(*points, strict=True)
                ax.plot(
                    xs, ys, linestyle=line, marker=marker, fillstyle=fill, color=color, label=label
                )
    counts = sorted({r.scenario.num_adapters for r in shown})
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set_xlabel("distinct adapters in the batch (rank 8; hollow diamonds: ranks 4..64)")
    ax.set_ylabel("sequences / s")
    ax.set_title(f"mixed-adapter batch, {batch} rows x {seq} tokens")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
