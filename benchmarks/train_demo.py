"""Train the two demo classifiers exactly as ``make demo`` does and report time and quality.

    python -m benchmarks.train_demo [--threads N] [--out benchmarks/out/train_demo.json]

Trains into a fresh temporary registry, so it never touches ./graft-registry.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from engine import load_backbone
    from registry import Registry
    from server.demo import DEMO_EPOCHS, DEMO_MODELS, DEMO_SAMPLE_ROWS, DEMO_TENANT
    from training import DATASETS, TrainConfig, train_adapter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/train_demo.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backbone = load_backbone()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Registry(tmp) as registry:
        registry.create_tenant(DEMO_TENANT)
        for name, dataset, _, max_length in DEMO_MODELS:
            config = TrainConfig(
                epochs=DEMO_EPOCHS, max_length=max_length, max_examples=DEMO_SAMPLE_ROWS
            )
            started = time.perf_counter()
            result = train_adapter(
                backbone,
                registry,
                DEMO_TENANT,
                name,
                DATASETS[dataset](),
                config,
                source=dataset,
                progress=False,
            )
            rows.append(
                {
                    "model": f"{DEMO_TENANT}/{name}",
                    "dataset": dataset,
                    "train_rows": result.record.manifest["training"]["train_examples"],
                    "held_out_rows": result.metrics["num_examples"],
                    "epochs_run": result.epochs_run,
                    "max_length": max_length,
                    "train_seconds": round(result.train_seconds, 1),
                    "wall_seconds": round(time.perf_counter() - started, 1),
                    "accuracy": round(result.metrics["accuracy"], 4),
                    "macro_f1": round(result.metrics["macro_f1"], 4),
                    "adapter_bytes": result.adapter_bytes,
                }
            )
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(f"machine: {machine}")
    print(
        f"{'model':<12} {'rows':>5} {'held-out':>8} {'epochs':>6} {'time s':>7} "
        f"{'accuracy':>8} {'macro-F1':>8} {'bytes':>9}"
    )
    for r in rows:
        print(
            f"{r['model']:<12} {r['train_rows']:>5} {r['held_out_rows']:>8} {r['epochs_run']:>6} "
            f"{r['train_seconds']:>7} {r['accuracy']:>8} {r['macro_f1']:>8} {r['adapter_bytes']:>9}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "results": rows}, indent=2))


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
