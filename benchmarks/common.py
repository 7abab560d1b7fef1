"""What the benchmarks share: the timer, the machine description, tables and output files.

Timings are medians over repetitions after warm-up, bounded in time; a benchmark reports them
as ratios against a baseline measured in the same process, never as absolute promises.
"""

import gc
import json
import math
import os
import platform
import random
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT_DIR = Path("benchmarks/out")


@dataclass(frozen=True, slots=True)
class TimingConfig:
    """How long and how often to time one configuration."""

    warmup: int  # untimed calls before measuring (allocator, oneDNN and autotuning caches)
    min_reps: int  # samples always taken, whatever the budget
    max_reps: int  # samples never exceeded
    budget_s: float  # after min_reps, stop adding samples once this much time per function
    min_sample_s: float  # repeat fast calls inside one sample until it lasts this long


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per call of one timed function."""

    median_s: float  # median over samples, per call
    min_s: float  # fastest sample, per call
    max_s: float  # slowest sample, per call: far above the median means a noisy machine
    num_samples: int
    calls_per_sample: int

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def serial_torch_here() -> None:
    """This thread (a harness's: fleets, clients, the event loop) runs torch on one thread, so
    the engine's model thread owns the process's only OpenMP team: a second team makes GNU
    OpenMP stop its workers spinning between ops (engine/adapter_store.py's loaders). Call
    it before this thread's first torch op."""
    torch.set_num_threads(1)


def exit_on_sigterm() -> None:
    """Turn SIGTERM (what ``timeout`` and process managers send) into ``SystemExit`` in the main
    thread, so ``with`` blocks unwind: a benchmark stopped at its time limit still removes its
    scratch registry (a 1,000-adapter BERT-base fleet is 5 GB). For ``__main__`` only."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def synchronizer(device: str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def measure(
    fns: Mapping[str, Callable[[], object]], config: TimingConfig, sync: Callable[[], None]
) -> dict[str, Timing]:
    """Time each function of ``fns``, interleaved: every round takes one sample of each, in a
    rotating order, so load from other processes falls on all of them alike.

    Rounds continue until ``min_reps``, then while the budget (``budget_s`` per function)
    lasts, and never beyond ``max_reps``.
    """
    names = list(fns)
    if not names:
        return {}
    for name in names:
        for _ in range(config.warmup):
            fns[name]()
    sync()
    calls = {name: _calls_per_sample(fns[name], config.min_sample_s, sync) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    budget_s = config.budget_s * len(names)
    started = time.perf_counter()
    for rounds in range(config.max_reps):
        if rounds >= config.min_reps and time.perf_counter() - started >= budget_s:
            break
        for name in names[rounds % len(names) :] + names[: rounds % len(names)]:
            samples[name].append(_sample(fns[name], calls[name], sync))
    return {name: _timing(samples[name], calls[name]) for name in names}


def _sample(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls


def _timing(samples: Sequence[float], calls: int) -> Timing:
    return Timing(
        median_s=statistics.median(samples),
        min_s=min(samples),
        max_s=max(samples),
        num_samples=len(samples),
        calls_per_sample=calls,
    )


def _calls_per_sample(
    fn: Callable[[], object], min_sample_s: float, sync: Callable[[], None]
) -> int:
    t0 = time.perf_counter()
    fn()
    sync()
    once_s = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(10_000, math.ceil(min_sample_s / once_s)))


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch threads, all cores when None; returns the count in effect."""
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str) -> dict[str, Any]:
    """Where the numbers came from; the load average hints at other work on the machine."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine(info: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in info.items())


def note_load(info: dict[str, Any]) -> str:
    """Record the load average after the run in ``info``; say whether others shared the CPU.

    The run itself adds about its thread count to the load (less on a GPU); more than that,
    at the start or the end, means other processes competed and the timings are noisy.
    """
    info["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    own = 1 if info["device"].startswith("cuda") else info["torch_threads"]
    start, end = info["load_average_1m"], info["load_average_1m_end"]
    busy = start > 0.5 or end > own + 0.5
    verdict = "other processes shared the CPU: noisy" if busy else "quiet"
    return f"load average (1 min): {start} at start, {end} at end, this run ~{own}; {verdict}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def int_list(text: str) -> tuple[int, ...]:
    """argparse type for "1,4,16,32"."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def real_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` real texts, SMS messages and BBC article openings alternating (short and long).

    Deterministic for a seed; needs the corpus packages ``training`` reads.
    """
    from training import load_bbc_news, load_sms_spam

    rng = random.Random(seed)
    half = (count + 1) // 2
    sms = rng.sample([e.text for e in load_sms_spam() if e.text.strip()], half)
    news = rng.sample([e.text for e in load_bbc_news()], half)
    return [(sms, news)[i % 2][i // 2] for i in range(count)]


RANDOM_LAYOUTS = ("bert", "distilbert")  # build_random_backbone's
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def build_random_backbone(
    out_dir: Path, *, hidden: int, layers: int, tokenizer_dir: Path, layout: str = "bert"
) -> Path:
    """An encoder of the given width and depth with random weights, saved as safetensors with
    ``tokenizer_dir``'s tokenizer: the shape of a bigger model without downloading one.
    ``layout`` is ``bert`` or ``distilbert`` (DistilBERT's module tree, no pooler).

    Heads are 64 wide (``hidden // 64`` of them, one when hidden is not a multiple of 64) and
    the feed-forward is ``4 * hidden``, as in BERT-base.
    """
    from transformers import AutoTokenizer

    if hidden < 1 or layers < 1:
        raise ValueError(f"--hidden and --layers must be >= 1, got {hidden} and {layers}")
    if layout not in RANDOM_LAYOUTS:
        raise ValueError(f"layout must be one of {RANDOM_LAYOUTS}, got {layout!r}")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    with torch.random.fork_rng():  # seeded weights without touching the caller's generator
        torch.manual_seed(0)
        model = _random_model(layout, len(tokenizer), hidden, layers, tokenizer.pad_token_id or 0)
    model.save_pretrained(str(out_dir))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def _random_model(layout: str, vocab: int, hidden: int, layers: int, pad: int) -> torch.nn.Module:
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    heads = hidden // 64 if hidden % 64 == 0 else 1
    if layout == "distilbert":
        return DistilBertModel(
            DistilBertConfig(
                vocab_size=vocab,
                dim=hidden,
                n_layers=layers,
                n_heads=heads,
                hidden_dim=4 * hidden,
                pad_token_id=pad,
            )
        )
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        pad_token_id=pad,
    )
    return BertModel(config)


def random_backbone_dir(
    work: Path,
    hidden: int | None,
    layers: int | None,
    *,
    default_layers: int,
    layout: str = "bert",
) -> str | None:
    """The ``--hidden``/``--layers`` flags of a benchmark: a random-weight encoder of that width
    and depth (with the packaged tokenizer) built under ``work``; None without ``--hidden``
    (the packaged MiniLM)."""
    if hidden is None:
        return None
    from engine import packaged_backbone_dir

    path = build_random_backbone(
        work / "backbone",
        hidden=hidden,
        layers=layers or default_layers,
        tokenizer_dir=packaged_backbone_dir(),
        layout=layout,
    )
    return str(path)


def names_of(allowed: Sequence[str]) -> Callable[[str], tuple[str, ...]]:
    """argparse type for a comma-separated subset of ``allowed``."""

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = sorted(set(names) - set(allowed))
        if unknown or not names:
            raise ValueError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return names

    parse.__name__ = "comma-separated name"  # argparse's error message names the type
    return parse


class GcPauses:
    """Time in Python's cycle collector while open: each pass stops every thread, so a long
    one lands in some request's latency. ``summary()`` after the ``with`` block."""

    def __init__(self) -> None:
        self.passes = [0, 0, 0]  # by generation; 2 = full
        self.seconds = 0.0
        self.longest_s = 0.0
        self._started: float | None = None

    def __enter__(self) -> "GcPauses":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc_info: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":  # passes never overlap: the collector holds the GIL throughout
            self._started = time.perf_counter()
        elif self._started is not None:
            took = time.perf_counter() - self._started
            self._started = None
            self.passes[info["generation"]] += 1
            self.seconds += took
            self.longest_s = max(self.longest_s, took)

    def summary(self) -> dict[str, float]:
        return {
            "gc_pause_ms": round(self.seconds * 1000, 1),
            "gc_longest_ms": round(self.longest_s * 1000, 1),
            "gc_full_passes": self.passes[2],
        }


def full_collection() -> dict[str, float]:
    """One full pass now, timed, and how many objects it walked (frozen ones excluded)."""
    tracked = len(gc.get_objects())
    started = time.perf_counter()
    gc.collect()
    return {
        "gc_tracked": tracked,
        "gc_full_pass_ms": round((time.perf_counter() - started) * 1e3, 1),
    }
