"""Tokenizing one SMS on the event loop while every core is busy: the Hugging Face call
against graft's TextEncoder.

    python -m benchmarks.tokenize_contention [--calls 2000] [--busy 0,1,2]

The Hugging Face call runs the Rust core's ``encode_batch``, which hands even one text to the
tokenizers library's worker pool; with every core busy, that hand-off waits for a core to be
scheduled. ``TextEncoder.inline`` encodes on the calling thread. ``--busy N`` starts N
processes that spin on a core each while the calls are timed.
"""

import argparse
import subprocess
import sys
import time
from collections.abc import Callable

from benchmarks.load_stats import percentile

TEXT = (
    "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121 to "
    "receive entry question(std txt rate)"
)


def _time_us(fn: Callable[[], object], calls: int) -> list[float]:
    fn()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1e6)
    return sorted(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--busy", default="0,1,2", help="spinning processes, comma-separated")
    args = parser.parse_args(argv)

    from engine import load_backbone
    from engine.inputs import TextEncoder

    tokenizer = load_backbone().tokenizer
    encoder = TextEncoder(tokenizer)
    ways = {
        "hugging face call": lambda: tokenizer([TEXT], add_special_tokens=True, truncation=False),
        "TextEncoder.inline": lambda: encoder.inline([TEXT]),
    }
    print(f"one SMS ({len(encoder.inline([TEXT])[0])} tokens), {args.calls} calls per row, us")
    print(f"{'busy processes':>14}  {'way':<20} {'p50':>8} {'p99':>8} {'max':>9}")
    for busy in (int(b) for b in args.busy.split(",")):
        spinners = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)
        ]
        try:
            time.sleep(0.5)
            for name, fn in ways.items():
                us = _time_us(fn, args.calls)
                print(
                    f"{busy:>14}  {name:<20} {percentile(us, 50):>8.0f} "
                    f"{percentile(us, 99):>8.0f} {us[-1]:>9.0f}"
                )
        finally:
            for spinner in spinners:
                spinner.kill()
                spinner.wait()


if __name__ == "__main__":
    main()
