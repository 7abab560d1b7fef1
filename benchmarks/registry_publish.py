"""Registry publish throughput: `publish` one by one against `publish_many`, durable or not.

    python -m benchmarks.registry_publish [--num-adapters 200] [--repeats 3]
    python -m benchmarks.registry_publish --quick      # 20 adapters, one repeat (seconds)

Each configuration publishes the same N tiny adapters (an adapter_config.json and a safetensors
file of three small float32 tensors, 619 bytes in all) into a fresh registry in a temp dir, spread
over 20 adapter names so that names get several versions. Configurations are interleaved within
each repeat, so a noisy neighbour slows all of them alike; the table gives the median over
repeats in ms per adapter, and each configuration's speed-up over the baseline, one-by-one durable
`publish`, measured in the same process. Raw numbers go to <out>/registry_publish.json, with the
load average before and after: on a shared machine fsyncs slow down with the neighbours' I/O, so
compare ratios, and runs only when their load was alike.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from registry import PublishItem, Registry

DEFAULT_OUT_DIR = Path("benchmarks/out")
_NUM_NAMES = 20
_MANIFEST = {"labels": ["ham", "spam"], "base_sha256": "ab" * 32, "rank": 4}


def publish_one_by_one(registry: Registry, items: Sequence[PublishItem]) -> None:
    for item in items:
        registry.publish(item.tenant, item.name, item.source_dir, item.manifest)


def publish_in_one_call(registry: Registry, items: Sequence[PublishItem]) -> None:
    registry.publish_many(items)


@dataclass(frozen=True, slots=True)
class Config:
    """One way of publishing the N adapters."""

    method: str  # the Registry method it times, for the table
    publish: Callable[[Registry, Sequence[PublishItem]], None]  # publishes all the items
    is_durable: bool  # the Registry's `durable` argument


CONFIGS = (
    Config("publish", publish_one_by_one, is_durable=True),  # the baseline
    Config("publish_many", publish_in_one_call, is_durable=True),
    Config("publish", publish_one_by_one, is_durable=False),
    Config("publish_many", publish_in_one_call, is_durable=False),
)


def write_tiny_adapter(directory: Path, seed: int) -> Path:
    """A rank-4, hidden-8 LoRA pair plus a 2-class head, and its config."""
    directory.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    tensors = {
        "lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "classifier.weight": rng.standard_normal((2, 8)).astype(np.float32),
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def time_config(config: Config, items: list[PublishItem], root: Path) -> float:
    """Seconds to publish `items` into a fresh registry at `root` (opening it not counted)."""
    with Registry(root, durable=config.is_durable) as registry:
        registry.create_tenant("bench")
        start_s = time.perf_counter()
        config.publish(registry, items)
        elapsed_s = time.perf_counter() - start_s
        if len(registry.list_adapters("bench")) != len(items):
            raise RuntimeError(f"{config} did not publish all {len(items)} adapters")
    return elapsed_s


def run(num_adapters: int, num_repeats: int) -> dict[Config, list[float]]:
    """Seconds per adapter of every configuration, one sample per repeat."""
    samples: dict[Config, list[float]] = {config: [] for config in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="graft-bench-") as temp:
        temp_dir = Path(temp)
        items = [
            PublishItem(
                "bench",
                f"adapter-{index % _NUM_NAMES}",
                write_tiny_adapter(temp_dir / "sources" / str(index), seed=index),
                _MANIFEST,
            )
            for index in range(num_adapters)
        ]
        for repeat in range(num_repeats):
            for config_index, config in enumerate(CONFIGS):
                root = temp_dir / f"registry-{repeat}-{config_index}"
                samples[config].append(time_config(config, items, root) / num_adapters)
    return samples


def report(samples: dict[Config, list[float]], num_adapters: int, load: str) -> str:
    baseline_s = statistics.median(samples[CONFIGS[0]])
    lines = [
        f"N = {num_adapters} adapters, {len(samples[CONFIGS[0]])} repeats, "
        f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {load}",
        "",
        "| method | durable | ms/adapter (median) | min | max | speed-up vs publish durable |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for config, seconds in samples.items():
        median_s = statistics.median(seconds)
        lines.append(
            f"| {config.method} | {config.is_durable} | {median_s * 1e3:.2f} | "
            f"{min(seconds) * 1e3:.2f} | {max(seconds) * 1e3:.2f} | {baseline_s / median_s:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-adapters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="20 adapters, one repeat")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help="folder for the JSON")
    args = parser.parse_args(argv)
    num_adapters, num_repeats = (20, 1) if args.quick else (args.num_adapters, args.repeats)
    if num_adapters < 1 or num_repeats < 1:
        raise ValueError("--num-adapters and --repeats must be >= 1")
    load_before = os.getloadavg()[0]
    samples = run(num_adapters, num_repeats)
    load = f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    print(report(samples, num_adapters, load))
    payload = {
        "num_adapters": num_adapters,
        "machine": {"platform": platform.platform(), "num_cpus": os.cpu_count(), "load": load},
        "results": [
            {
                "method": config.method,
                "durable": config.is_durable,
                "s_per_adapter": seconds,
                "median_ms": statistics.median(seconds) * 1e3,
            }
            for config, seconds in samples.items()
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "registry_publish.json").write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
