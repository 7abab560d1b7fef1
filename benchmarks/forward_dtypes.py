"""The bare backbone's forward per dtype and attention implementation, for a small padded batch.

    python -m benchmarks.forward_dtypes --device cuda [--hidden 768 --layers 12] [--rows 8]

Why: on an H200 a random-weight BERT-base in bfloat16 ran ~65 ms a step under load, against
~7 ms for MiniLM in float32; this separates the dtype and the attention kernel from the engine.
Median milliseconds per forward (synchronized), and each one as a ratio against float32/sdpa.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks import common

DTYPES = ("float32", "bfloat16", "float16")
ATTENTION = ("sdpa", "eager")


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, help="random-weight BERT of this width")
    p.add_argument("--layers", type=int, default=12, help="with --hidden: its depth")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=24, help="longest row; the others shorter")
    p.add_argument("--budget-s", type=float, default=0.3)
    args = p.parse_args(argv)
    from transformers import AutoModel

    from engine import packaged_backbone_dir

    with tempfile.TemporaryDirectory(prefix="graft-dtypes-") as tmp:
        path = packaged_backbone_dir()
        if args.hidden:
            path = common.build_random_backbone(
                Path(tmp) / "bert", hidden=args.hidden, layers=args.layers, tokenizer_dir=path
            )
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, 20000, (args.rows, args.tokens), generator=gen)
        mask = torch.ones_like(ids)
        for i in range(args.rows):  # a padded batch, as a step of short texts is
            mask[i, args.tokens - i % (args.tokens // 2) :] = 0
        ids, mask = ids.to(args.device), mask.to(args.device)
        timing = common.TimingConfig(3, 5, 200, args.budget_s, 0.0)
        results: dict[str, float] = {}
        for attn in ATTENTION:
            for name in DTYPES:
                model = AutoModel.from_pretrained(
                    str(path),
                    local_files_only=True,
                    dtype=getattr(torch, name),
                    attn_implementation=attn,
                )
                model = model.to(args.device).eval()
                where = next(model.parameters()).device

                def forward(model=model) -> None:
                    with torch.inference_mode():
                        model(input_ids=ids, attention_mask=mask)

                sync = common.synchronizer(args.device)
                ms = common.measure({"f": forward}, timing, sync)["f"].median_s * 1000
                results[f"{name}/{attn}"] = ms
                base = results["float32/sdpa"]
                print(
                    f"{name:9s} {attn:5s} on {where}: {ms:8.2f} ms ({ms / base:.2f}x)", flush=True
                )
                del model
    return results


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
