"""What a long text costs the serving tokenizer: all of it encoded, against the prefix that
`tokenize_inputs` encodes (the same ids for the model's first 512 tokens).

    python -m benchmarks.long_inputs [--sizes 4096,65536,1048576,4194304] [--calls 5]

Texts are BBC news articles from the packaged corpus, joined until each size is reached:
a tenant's long document, as the 4 MiB body cap allows one.
"""

import argparse
import functools
import statistics
import time
from collections.abc import Callable


def _median_ms(fn: Callable[[], object], calls: int) -> float:
    fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e3)
    return statistics.median(out)


def _document(num_chars: int) -> str:
    from training import load_bbc_news

    articles = [e.text for e in load_bbc_news(max_chars=20_000)]
    parts, size = [], 0
    while size < num_chars:
        article = articles[len(parts) % len(articles)]
        parts.append(article)
        size += len(article) + 1
    return " ".join(parts)[:num_chars]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,65536,1048576,4194304", help="characters")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per cell (median)")
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args(argv)

    from engine import load_backbone
    from engine.inputs import tokenize_inputs

    encoder = load_backbone().encoder
    print(f"median of {args.calls} calls, ms; the model reads {args.max_tokens} tokens")
    print(f"{'characters':>12} {'tokens':>9} {'all of it':>11} {'as served':>11} {'ratio':>8}")
    for size in (int(s) for s in args.sizes.split(",")):
        texts = [_document(size)]
        served = functools.partial(
            tokenize_inputs,
            encoder,
            texts,
            max_tokens=args.max_tokens,
            truncate=True,
            max_inputs=1,
            pooled=True,
        )
        whole = encoder.pooled(texts)[0]
        cut = whole if len(whole) <= args.max_tokens else whole[: args.max_tokens - 1] + whole[-1:]
        assert list(served().ids[0]) == cut, "the served ids differ from encoding all of it"
        all_ms = _median_ms(functools.partial(encoder.pooled, texts), args.calls)
        served_ms = _median_ms(served, args.calls)
        print(
            f"{size:>12,} {len(whole):>9,} {all_ms:>11.2f} {served_ms:>11.2f} "
            f"{all_ms / served_ms:>7.0f}x"
        )


if __name__ == "__main__":
    main()
