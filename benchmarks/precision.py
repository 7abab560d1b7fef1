"""Serving in bfloat16 or with int8 weights against float32: do trained models' answers change?

    make demo        # trains demo/spam and demo/news into ./graft-registry, once
    python -m benchmarks.precision [--registry graft-registry] [--dtype bfloat16] [--rows 600]
    python -m benchmarks.precision --quantize int8   # int8 backbone weights, float32 the rest

The demo models were trained in float32 on a 1,000-row sample of their packaged data set; this
scores rows outside that sample with one engine per setting and prints, per model, macro-F1 under
each, the share of inputs whose label is the same, the largest score difference, and the time
each engine took. Adapters are trained in float32 whatever the serving dtype.
"""

import argparse
import asyncio
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

BATCH = 32


def _held_out(dataset: str, rows: int, sample_rows: int, seed: int = 0) -> list:
    """Rows of ``dataset`` that the demo's training sample (recipe.py's first step) left out."""
    from training import DATASETS
    from training.data import clean_examples, normalise_text
    from training.datasets import stratified_sample

    examples = clean_examples(DATASETS[dataset]())
    trained = {normalise_text(e.text) for e in stratified_sample(examples, sample_rows, seed)}
    return [e for e in examples if normalise_text(e.text) not in trained][:rows]


def _macro_f1(truth: list[str], predicted: list[str]) -> float:
    scores = []
    for label in sorted(set(truth)):
        tp = sum(t == label and p == label for t, p in zip(truth, predicted, strict=True))
        fp = sum(t != label and p == label for t, p in zip(truth, predicted, strict=True))
        fn = sum(t == label and p != label for t, p in zip(truth, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


async def _score(
    registry: Path, dtype: str, jobs: list[tuple[str, list]], quantize: str = "none"
) -> list[tuple]:
    from engine import Engine, EngineConfig

    out = []
    config = EngineConfig(registry_dir=registry, dtype=dtype, quantize=quantize)
    async with Engine(config) as engine:
        for model, examples in jobs:
            texts = [e.text for e in examples]
            await engine.classify("demo", model, texts[:1])  # load the adapter before timing
            start = time.perf_counter()
            predictions = []
            for i in range(0, len(texts), BATCH):
                predictions += await engine.classify("demo", model, texts[i : i + BATCH])
            out.append((predictions, time.perf_counter() - start))
    return out


async def run(args: argparse.Namespace) -> None:
    from server.demo import DEMO_MODELS, DEMO_SAMPLE_ROWS

    jobs = [(name, _held_out(data, args.rows, DEMO_SAMPLE_ROWS)) for name, data, *_ in DEMO_MODELS]
    reference = await _score(args.registry, "float32", jobs)
    other = await _score(args.registry, args.dtype, jobs, args.quantize)
    name = args.dtype if args.quantize == "none" else f"{args.quantize} weights"
    print(f"demo models, rows outside the training sample: float32 against {name}")
    print(
        "model  rows  macro-F1 fp32  macro-F1 other  same label  max |score diff|  "
        "time fp32 / other"
    )
    for (model, examples), (ref, ref_s), (got, got_s) in zip(jobs, reference, other, strict=True):
        truth = [e.label for e in examples]
        same = sum(a.label == b.label for a, b in zip(ref, got, strict=True)) / len(ref)
        diff = max(
            abs(score - b.scores[label])
            for a, b in zip(ref, got, strict=True)
            for label, score in a.scores.items()
        )
        print(
            f"{model:5s}  {len(examples):4d}  {_macro_f1(truth, [p.label for p in ref]):13.4f}  "
            f"{_macro_f1(truth, [p.label for p in got]):14.4f}  {same:10.4f}  {diff:15.4f}  "
            f"{ref_s:6.1f} / {got_s:.1f} s"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", type=Path, default=Path("graft-registry"))
    parser.add_argument("--dtype", default=None, help="compared against float32 (default bfloat16)")
    parser.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: compare a float32 engine with int8 backbone weights instead",
    )
    parser.add_argument("--rows", type=int, default=600, help="held-out rows per model")
    args = parser.parse_args(argv)
    if args.dtype is None:
        args.dtype = "float32" if args.quantize != "none" else "bfloat16"
    if not (args.registry / "catalog.sqlite3").exists():
        parser.error(f"no registry at {args.registry}: run `make demo` first, or pass --registry")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
