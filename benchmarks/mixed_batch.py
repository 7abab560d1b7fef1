"""Mixed-adapter batch throughput: graft against the bare base model, PEFT and merged models.

    python -m benchmarks.mixed_batch              # headline: batch 32 x 64 tokens, N = 1,4,16,32
    python -m benchmarks.mixed_batch --sweep      # and a grid of batch sizes x sequence lengths
    python -m benchmarks.mixed_batch --quick      # tiny smoke configuration (the test runs it)
    python -m benchmarks.mixed_batch --hidden 768 --layers 12 --device cuda  # BERT-base shape

In one process, on the same token ids (real SMS and BBC texts) and the same adapter weights:

- ``base``: the backbone alone (``AutoModel``, a clean copy, no adapters): the ceiling;
- ``graft-<kernel>``: ``ModelRunner.step`` on a prebuilt batch of N resident adapters, for each
  LoRA kernel (``loop``, ``gather``, ``auto``); the step includes padding the token lists, the
  plan, the heads and the softmax, as in serving;
- ``peft``: one ``PeftModel`` holding the adapters, ``adapter_names=[...]`` per row;
- ``merged``: one ``merge_and_unload`` model per adapter, each running its own rows.

Adapters are random PEFT ``SEQ_CLS`` LoRA adapters on every Linear named query, key, value or
dense (the pooler's dense included), written once with ``engine.write_peft_adapter``. The
methods are timed interleaved (one sample of each per round), so load from other processes
falls on all of them alike; on a shared machine ``--threads 1`` still gives steadier ratios, as
OpenMP threads stall whenever another process takes one of their cores.
"""

import argparse
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import common

METHODS = ("base", "graft-loop", "graft-gather", "graft-auto", "peft", "merged")
UNIFORM_RANKS = "r8"
MIXED_RANKS = "r4-64"
MIXED_RANK_CYCLE = (64, 4, 16, 8, 32)
TARGETS = ("query", "key", "value", "dense")  # every encoder Linear, and the pooler's dense
LORA_ALPHA = 16.0
LABELS = ("neg", "pos")

Step = Callable[[], np.ndarray | None]  # one batch through one method: probabilities or None


@dataclass(frozen=True, slots=True)
class Scenario:
    """One measured configuration: every method runs the same rows."""

    batch: int  # rows per step
    seq_tokens: int  # every row truncated or padded to this many tokens
    num_adapters: int  # distinct adapters among the rows
    ranks: str  # UNIFORM_RANKS (all rank 8) or MIXED_RANKS (MIXED_RANK_CYCLE over adapters)

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq_tokens} N={self.num_adapters} {self.ranks}"

    def adapter_ranks(self) -> dict[str, int]:
        """Name -> rank of its adapters: the first N of the rank-8 set or of the mixed set."""
        if self.ranks == UNIFORM_RANKS:
            return {f"r8_{i}": 8 for i in range(self.num_adapters)}
        cycle = MIXED_RANK_CYCLE
        return {f"mix_{i}": cycle[i % len(cycle)] for i in range(self.num_adapters)}


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


@dataclass(frozen=True, slots=True)
class Workload:
    """The rows of one scenario, in the order every method sees them (grouped by adapter)."""

    token_ids: list[list[int]]  # per row, special tokens included, at most seq_tokens
    input_ids: torch.Tensor  # int64 [B, T] on the device, padded with the pad id
    attention_mask: torch.Tensor  # int64 [B, T], 0 on padding
    row_adapters: tuple[str, ...]  # adapter name of each row
    seg_starts: tuple[int, ...]  # S + 1 row offsets of the adapter groups
    seq_tokens: int  # T


def write_adapters(backbone: Any, root: Path, ranks: dict[str, int]) -> dict[str, Path]:
    """Random PEFT SEQ_CLS adapters (LoRA on TARGETS, a 2-class head), one directory each."""
    from engine import write_peft_adapter

    gen = torch.Generator().manual_seed(0)
    targets = [n for n in backbone.linear_names if n.rsplit(".", 1)[-1] in TARGETS]
    dirs = {}
    for name, rank in ranks.items():
        modules = {}
        for target in targets:
            linear = backbone.linears[target]
            a = torch.randn(rank, linear.in_features, generator=gen) * 0.05
            b = torch.randn(linear.out_features, rank, generator=gen) * 0.05
            modules[target] = (a, b)
        head = torch.randn(len(LABELS), backbone.hidden_size, generator=gen)
        dirs[name] = root / name
        write_peft_adapter(
            dirs[name],
            backbone,
            modules,
            rank=rank,
            alpha=LORA_ALPHA,
            head_weight=head * 2 / backbone.hidden_size**0.5,  # logits of order 1
            head_bias=torch.randn(len(LABELS), generator=gen) * 0.1,
        )
    return dirs


class Contenders:
    """The four ways to run a mixed batch over one set of adapters; each loaded on first use.

    Each model is its own copy: graft's wrapped backbone, a clean ``AutoModel``, a PEFT model,
    and a template the merged copies are made from.
    """

    def __init__(
        self, backbone: Any, adapters: dict[str, tuple[Path, int]], device: str, dtype: torch.dtype
    ) -> None:
        self._backbone = backbone
        self._adapters = adapters  # name -> (PEFT directory, rank)
        self._device, self._dtype = device, dtype
        self._memory: Any = None
        self._base: Any = None
        self._peft: Any = None
        self._merge_template: Any = None
        self._merged: dict[str, Any] = {}

    @classmethod
    def build(
        cls, model_dir: Path, adapter_root: Path, plan: Sequence[Scenario], device: str, dtype: Any
    ) -> "Contenders":
        from engine import load_backbone

        backbone = load_backbone(model_dir, device=device, dtype=dtype)
        ranks = {name: r for scenario in plan for name, r in scenario.adapter_ranks().items()}
        dirs = write_adapters(backbone, adapter_root, ranks)
        return cls(backbone, {name: (dirs[name], ranks[name]) for name in ranks}, device, dtype)

    def describe(self) -> str:
        config = self._backbone.model.config
        names = self._backbone.linear_names
        targeted = sum(n.rsplit(".", 1)[-1] in TARGETS for n in names)
        dtype = str(self._dtype).removeprefix("torch.")
        return (
            f"{config.model_type}, hidden {config.hidden_size}, {config.num_hidden_layers} "
            f"layers, LoRA on {targeted} of {len(names)} Linears, {dtype}"
        )

    def workload(self, scenario: Scenario, texts: Sequence[str]) -> Workload:
        """Rows i = texts[i]; adapters dealt round-robin, then rows grouped by adapter, the
        groups ordered by rank as the engine's planner orders segments."""
        ranks = scenario.adapter_ranks()
        names = list(ranks)
        rows = sorted(
            (names[i % len(names)] for i in range(scenario.batch)),
            key=lambda name: (ranks[name], names.index(name)),
        )
        starts = [0] + [i for i in range(1, len(rows)) if rows[i] != rows[i - 1]] + [len(rows)]
        tokenizer = self._backbone.tokenizer
        encoded = tokenizer(
            list(texts[: scenario.batch]), truncation=True, max_length=scenario.seq_tokens
        )["input_ids"]
        ids = torch.full((scenario.batch, scenario.seq_tokens), tokenizer.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(encoded):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return Workload(
            token_ids=[list(row) for row in encoded],
            input_ids=ids.to(self._device),
            attention_mask=mask.to(self._device),
            row_adapters=tuple(rows),
            seg_starts=tuple(starts),
            seq_tokens=scenario.seq_tokens,
        )

    def step(self, method: str, work: Workload) -> Step | None:
        """``work`` through ``method`` as a no-argument call; None where it cannot run here."""
        if method == "base":
            return self._base_step(work)
        if method.startswith("graft-"):
            return self._graft_step(method.removeprefix("graft-"), work)
        if method == "peft":
            return self._peft_step(work)
        if method == "merged":
            return self._merged_step(work)
        raise ValueError(f"unknown method {method!r}")

    def _base_step(self, work: Workload) -> Step:
        from transformers import AutoModel

        if self._base is None:
            self._base = self._load(AutoModel)

        def step() -> None:
            with torch.inference_mode():
                self._base(input_ids=work.input_ids, attention_mask=work.attention_mask)

        return step

    def _graft_step(self, kernel: str, work: Workload) -> Step | None:
        from engine.lora_kernels import kernel_for
        from engine.runner import ModelRunner
        from scheduler import Batch, Row

        try:
            lora_kernel = kernel_for(kernel, self._device)
        except ImportError as exc:  # the Triton path, where it is not there yet
            print(f"  graft-{kernel}: skipped ({exc})")
            return None
        runner = ModelRunner(self._backbone, self._graft_memory(), self._device, lora_kernel)
        keys = [f"bench/{name}@1" for name in work.row_adapters]
        rows = tuple(
            Row(i, 0, "bench", key, len(work.token_ids[i]), 0.0) for i, key in enumerate(keys)
        )
        seg_adapter = tuple(keys[lo] for lo in work.seg_starts[:-1])
        batch = Batch(rows, work.seg_starts, seg_adapter, max_tokens=work.seq_tokens)
        return lambda: np.stack(runner.step(batch, work.token_ids))

    def _graft_memory(self) -> Any:
        """Every adapter resident in one AdapterMemory, as a warm serving engine holds them."""
        from engine import POOLING_CLS_POOLER, parse_adapter
        from engine.memory import AdapterMemory
        from engine.peft_io import CONFIG_FILE, WEIGHTS_FILE

        if self._memory is None:
            num_pages = sum(rank for _, rank in self._adapters.values())
            self._memory = AdapterMemory(self._backbone, num_pages, self._device, self._dtype)
            for name, (path, _) in self._adapters.items():
                config, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
                adapter = parse_adapter(
                    config.read_bytes(),
                    weights.read_bytes(),
                    LABELS,
                    POOLING_CLS_POOLER,
                    self._backbone,
                )
                self._memory.acquire(f"bench/{name}@1", lambda a=adapter: a)
        return self._memory

    def _load(self, auto_class: Any, **kwargs: Any) -> Any:
        model = auto_class.from_pretrained(
            str(self._backbone.path), local_files_only=True, dtype=self._dtype, **kwargs
        )
        return model.to(self._device).eval()

    def _peft_step(self, work: Workload) -> Step:
        import peft
        from transformers import AutoModelForSequenceClassification

        if self._peft is None:
            (first, (path, _)), *rest = self._adapters.items()
            classifier = self._load(AutoModelForSequenceClassification, num_labels=len(LABELS))
            model = peft.PeftModel.from_pretrained(classifier, str(path), adapter_name=first)
            for name, (path, _) in rest:
                model.load_adapter(str(path), adapter_name=name)
            self._peft = model.to(self._device).eval()
        names = list(work.row_adapters)

        def step() -> np.ndarray:
            with torch.inference_mode():
                out = self._peft(
                    input_ids=work.input_ids,
                    attention_mask=work.attention_mask,
                    adapter_names=names,
                )
            return _probs(out.logits)

        return step

    def _merged_step(self, work: Workload) -> Step:
        bounds = list(zip(work.seg_starts[:-1], work.seg_starts[1:], strict=True))
        self._keep_merged({work.row_adapters[lo] for lo, _ in bounds})
        groups = [(self._merged[work.row_adapters[lo]], lo, hi) for lo, hi in bounds]

        def step() -> np.ndarray:
            with torch.inference_mode():
                logits = [
                    model(
                        input_ids=work.input_ids[lo:hi], attention_mask=work.attention_mask[lo:hi]
                    ).logits
                    for model, lo, hi in groups
                ]
            return _probs(torch.cat(logits))

        return step

    def _keep_merged(self, names: set[str]) -> None:
        """Hold merged copies for exactly ``names``: N full models is what this baseline costs."""
        import peft
        from transformers import AutoModelForSequenceClassification

        for name in set(self._merged) - names:
            del self._merged[name]
        if self._merge_template is None:
            self._merge_template = self._load(
                AutoModelForSequenceClassification, num_labels=len(LABELS)
            )
        template = self._merge_template
        # the embeddings carry no LoRA: sharing them halves the copies' memory, not their compute
        shared = getattr(template.base_model, "embeddings", None)
        for name in sorted(names - set(self._merged)):
            copy = deepcopy(template, memo={id(shared): shared} if shared is not None else {})
            path = self._adapters[name][0]
            self._merged[name] = peft.PeftModel.from_pretrained(copy, str(path)).merge_and_unload()


def _probs(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()


def run_scenario(
    scenario: Scenario,
    contenders: Contenders,
    texts: Sequence[str],
    args: argparse.Namespace,
) -> list[Result]:
    """Time every method on one scenario, interleaved, and compare their probabilities."""
    work = contenders.workload(scenario, texts)
    steps: dict[str, Step] = {}
    outputs: dict[str, np.ndarray | None] = {}
    for method in args.methods:
        step = contenders.step(method, work)
        if step is not None:
            steps[method] = step
            outputs[method] = step()  # untimed first call: warms up, gives outputs to compare
    timings = common.measure(steps, timing_config(args), common.synchronizer(args.device))
    rate = {m: scenario.batch / t.median_s for m, t in timings.items()}
    print(f"  {scenario.label}: " + "  ".join(f"{m} {r:.1f}" for m, r in rate.items()) + " seq/s")
    reference = next((m for m in ("peft", "merged") if m in timings), None)
    expected = outputs[reference] if reference else None
    return [
        Result(
            scenario=scenario,
            method=method,
            seq_per_s=rate[method],
            timing=timing,
            vs_base=common.ratio(rate[method], rate.get("base")),
            vs_peft=common.ratio(rate[method], rate.get("peft")),
            max_abs_diff=_max_diff(outputs[method], expected) if method != reference else None,
        )
        for method, timing in timings.items()
    ]


def _max_diff(got: np.ndarray | None, expected: np.ndarray | None) -> float | None:
    if got is None or expected is None:
        return None
    return float(np.abs(got - expected).max())


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


def profile_graft(contenders: Contenders, work: Workload, methods: Sequence[str]) -> None:
    """torch.profiler's top operators for one graft step per kernel: where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    for method in (m for m in methods if m.startswith("graft-")):
        step = contenders.step(method, work)
        if step is None:
            continue
        step()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step()
        print(f"\nprofile of one {method} step ({len(work.row_adapters)} rows):")
        table = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40
        )
        print(table)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32, help="rows per step (headline)")
    p.add_argument("--seq", type=int, default=64, help="tokens per row (headline)")
    p.add_argument("--adapters", type=common.int_list, default=(1, 4, 16, 32), help="N values")
    p.add_argument("--mixed-adapters", type=int, help="N of the mixed-rank run (largest N)")
    p.add_argument("--methods", type=common.names_of(METHODS), default=METHODS)
    p.add_argument("--sweep", action="store_true", help="also run the batch x seq grid")
    p.add_argument("--sweep-batches", type=common.int_list, default=(8, 32, 128))
    p.add_argument("--sweep-seqs", type=common.int_list, default=(32, 64, 128))
    p.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--hidden", type=int, help="random-weight BERT backbone of this width")
    p.add_argument("--layers", type=int, help="random-weight BERT backbone of this depth")
    p.add_argument("--budget-s", type=float, default=2.5, help="timing budget per method")
    p.add_argument("--profile", action="store_true", help="profile one graft step per kernel")
    p.add_argument("--out", type=Path, default=common.DEFAULT_OUT_DIR)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.adapters, args.sweep = 4, 16, (1, 4), False
    return args


def timing_config(args: argparse.Namespace) -> common.TimingConfig:
    if args.quick:
        return common.TimingConfig(warmup=0, min_reps=1, max_reps=1, budget_s=0.0, min_sample_s=0.0)
    return common.TimingConfig(
        warmup=1, min_reps=3, max_reps=25, budget_s=args.budget_s, min_sample_s=0.0
    )


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    """Per shape (the headline first): rank 8 for each N, then one mixed-rank run."""
    shapes = [(args.batch, args.seq)]
    if args.sweep:
        grid = [(b, s) for b in args.sweep_batches for s in args.sweep_seqs]
        shapes += [shape for shape in grid if shape != shapes[0]]
    found: list[Scenario] = []
    for batch, seq in shapes:
        counts = [n for n in args.adapters if n <= batch]
        found += [Scenario(batch, seq, n, UNIFORM_RANKS) for n in counts]
        mixed = min(args.mixed_adapters or max(counts, default=1), batch)
        found.append(Scenario(batch, seq, mixed, MIXED_RANKS))
    return found


def quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet_libraries()
    common.set_threads(args.threads)
    plan = scenarios(args)
    machine = common.machine_info(args.device)
    print(f"machine: {common.describe_machine(machine)}")
    texts = common.real_texts(max(s.batch for s in plan))
    tmp = Path(tempfile.mkdtemp(prefix="graft-bench-"))
    try:
        model_dir = _backbone_dir(args, tmp)
        dtype = getattr(torch, args.dtype)
        contenders = Contenders.build(model_dir, tmp / "adapters", plan, args.device, dtype)
        print(f"backbone: {model_dir} ({contenders.describe()})")
        results = [r for s in plan for r in run_scenario(s, contenders, texts, args)]
        load_note = common.note_load(machine)
        if args.profile:
            largest = max(plan, key=lambda s: (s.ranks == UNIFORM_RANKS, s.num_adapters))
            profile_graft(contenders, contenders.workload(largest, texts), args.methods)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    payload = _report(args, machine, contenders.describe(), results)
    print(load_note)
    return payload


def _backbone_dir(args: argparse.Namespace, tmp: Path) -> Path:
    from engine import packaged_backbone_dir

    if args.hidden is None and args.layers is None:
        return packaged_backbone_dir()
    return common.build_random_backbone(
        tmp / "backbone",
        hidden=args.hidden or 384,
        layers=args.layers or 6,
        tokenizer_dir=packaged_backbone_dir(),
    )


def _report(
    args: argparse.Namespace, machine: dict[str, Any], backbone: str, results: list[Result]
) -> dict[str, Any]:
    rows = summary(results)
    print("\n" + results_table(results))
    print(
        "\nseq/s at the median step, best = at the fastest step; max|dp| = largest difference of "
        "any row's class\nprobabilities from PEFT's (from merged's where PEFT did not run)."
    )
    print("\n" + summary_table(rows))
    png = args.out / "mixed_batch.png"
    payload = {
        "benchmark": "mixed_batch",
        "machine": machine,
        "backbone": backbone,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "results": [r.as_json() for r in results],
        "summary": rows,
        "plot": str(png) if plot(results, args.batch, args.seq, png) else None,
    }
    common.write_json(args.out / "mixed_batch.json", payload)
    print(f"\nwrote {args.out / 'mixed_batch.json'}; plot: {payload['plot'] or 'no matplotlib'}")
    return payload


if __name__ == "__main__":
    main()
