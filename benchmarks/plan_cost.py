"""What forming one step costs the event loop: ``Scheduler.plan`` over deep queues.

    python -m benchmarks.plan_cost [--plans 50]

The planner runs on the event loop between steps; on a GPU a step takes ~10 ms of host time,
so milliseconds of planning are requests not admitted. Queues are SMS-like lengths (log-normal,
median ~20 tokens, 3 to 186), every tenant's queue deep enough that no plan empties it,
every row with a deadline a minute away, as the engine gives them.
Prints the median and worst plan time, and the rows each plan took. Then how many rows a step
holds when one tenant's queue is real SMS (the packaged corpus, tokenized by the packaged
backbone's tokenizer) in arrival order, with and without the planner's lookahead.
"""

import argparse
import itertools
import random
import time

from scheduler import Row, Scheduler, SchedulerConfig

SHAPES = ((100, 100), (10, 1000))  # (tenants, rows queued per tenant)


def measure(tenants: int, rows_each: int, lookahead: int, plans: int) -> dict[str, float]:
    rng = random.Random(0)
    ids = itertools.count(1)
    config = SchedulerConfig(
        contended_batch_tokens=None, lookahead_rows=lookahead, max_queued_rows=10**6
    )
    scheduler = Scheduler(config)
    for tenant in range(tenants):
        for _ in range(rows_each):
            tokens = int(min(186, max(3, rng.lognormvariate(3.0, 0.6))))
            scheduler.add(
                Row(
                    request_id=next(ids),
                    index=0,
                    tenant=f"t{tenant}",
                    adapter_key=f"t{tenant}/a",
                    num_tokens=tokens,
                    arrival_s=0.0,
                    num_pages=8,
                    deadline_s=60.0,  # the engine gives every row one (max_timeout_s)
                )
            )
    times, rows = [], []
    for _ in range(plans):
        started = time.perf_counter()
        batch = scheduler.plan(1.0).batch
        times.append(time.perf_counter() - started)
        rows.append(len(batch.rows) if batch else 0)
    times.sort()
    return {
        "p50_ms": times[len(times) // 2] * 1000,
        "max_ms": times[-1] * 1000,
        "rows_per_plan": sum(rows) / len(rows),
    }


def sms_steps(num_texts: int, lookahead: int, seed: int = 0) -> dict[str, float]:
    """Queue ``num_texts`` random SMS for one tenant, in that order, and drain the queue."""
    import numpy as np
    from transformers import AutoTokenizer

    from benchmarks.arrivals import load_corpus
    from engine import packaged_backbone_dir

    texts = random.Random(seed).sample(load_corpus("sms"), num_texts)
    tokenizer = AutoTokenizer.from_pretrained(str(packaged_backbone_dir()), local_files_only=True)
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    config = SchedulerConfig(contended_batch_tokens=None, lookahead_rows=lookahead)
    scheduler = Scheduler(config)
    for i, tokens in enumerate(lengths):
        scheduler.add(
            Row(
                request_id=i + 1,
                index=0,
                tenant="t0",
                adapter_key="t0/a",
                num_tokens=tokens,
                arrival_s=float(i),
                num_pages=8,
            )
        )
    steps = 0
    while scheduler.plan(0.0).batch is not None:
        steps += 1
    low, median, high = np.percentile(lengths, [0, 50, 100])
    return {
        "steps": steps,
        "rows_per_step": num_texts / steps,
        "tokens_min": float(low),
        "tokens_median": float(median),
        "tokens_max": float(high),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plans", type=int, default=50)
    p.add_argument("--sms", type=int, default=2000, help="SMS queued for the one-tenant probe")
    args = p.parse_args(argv)
    results = []
    for (tenants, rows_each), lookahead in itertools.product(SHAPES, (0, 64)):
        found = measure(tenants, rows_each, lookahead, args.plans)
        results.append({"tenants": tenants, "lookahead": lookahead, **found})
        print(
            f"{tenants:4d} tenants, lookahead {lookahead:2d}: plan p50 {found['p50_ms']:.2f} ms, "
            f"worst {found['max_ms']:.2f} ms, {found['rows_per_plan']:.1f} rows a plan",
            flush=True,
        )
    for lookahead in (0, 64):
        found = sms_steps(args.sms, lookahead)
        results.append({"sms": args.sms, "lookahead": lookahead, **found})
        print(
            f"{args.sms} SMS of one tenant ({found['tokens_min']:.0f}-{found['tokens_max']:.0f} "
            f"tokens, median {found['tokens_median']:.0f}), lookahead {lookahead:2d}: "
            f"{found['steps']} steps, {found['rows_per_step']:.1f} rows a step",
            flush=True,
        )
    return results


if __name__ == "__main__":
    main()
