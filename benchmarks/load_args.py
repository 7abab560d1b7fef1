"""``benchmarks.load``'s command line: targets, traffic, engine settings, encoder."""

import argparse
from collections.abc import Sequence
from pathlib import Path

from benchmarks import report
from benchmarks.arrivals import ARRIVALS, CORPORA, POPULARITIES

DESCRIPTION = "Load test: open-loop, many tenants, real texts, against graft embedded or over HTTP."
OUT_DIR = Path(__file__).resolve().parent / "out" / "load"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=DESCRIPTION)
    _add_target(p)
    _add_traffic(p)
    _add_engine(p)
    _add_model(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT_DIR)
    p.add_argument("--quick", action="store_true", help="tiny configuration (tests)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.url and not args.key:
        p.error("--url needs --key (one per tenant to drive)")
    if args.layers is not None and args.hidden is None:
        p.error("--layers needs --hidden (the random-weight backbone it sizes)")
    if args.probe_seconds is not None and args.probe_seconds <= 0:
        p.error(f"--probe-seconds must be positive, got {args.probe_seconds:g}")
    if args.arrival == "poisson" and args.cv != 1.0:  # a header would claim CV for Poisson
        p.error("--cv sets gamma arrivals' burstiness: add --arrival gamma (Poisson's CV is 1)")
    if not args.cv > 0:
        p.error(f"--cv must be positive, got {args.cv:g}")
    return args


def _add_target(p: argparse.ArgumentParser) -> None:
    """What the load is sent to, and which scenarios."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--embedded", action="store_true", help="in-process Engine (default)")
    where.add_argument("--serve", action="store_true", help="graft's HTTP server, started here")
    where.add_argument("--url", help="a running graft (or peft_server) HTTP server")
    where.add_argument("--baseline", choices=("backbone", "peft"))
    p.add_argument("--key", action="append", default=[], help="API key with --url (repeatable)")
    p.add_argument("--scenarios", action="store_true", help="run the standard scenario set")
    p.add_argument(
        "--only", help="with --scenarios: comma-separated scenario names to run, in that order"
    )
    p.add_argument("--name", help="scenario name in file names and tables")
    p.add_argument(
        "--server-thread",
        action="store_true",
        help="run graft's and the PEFT server in a thread of this process (default: each in "
        "its own process, as deployed; a thread shares the load generator's interpreter lock)",
    )
    p.add_argument(
        "--server-workers",
        type=int,
        default=0,
        help="graft's server with this many front-end processes (graft serve --workers; "
        "default 0: one process)",
    )
    p.add_argument(
        "--driver-processes",
        type=int,
        default=1,
        help="send HTTP targets' requests from this many processes, each a share of every "
        "rate's schedule (one process falls behind past ~2,500 req/s on a GPU host); "
        "in-process targets (embedded, backbone) keep one",
    )


def _add_traffic(p: argparse.ArgumentParser) -> None:
    """The requests: texts, tenants, popularity, arrivals, rates, bounds."""
    p.add_argument("--corpus", choices=CORPORA, default="sms")
    p.add_argument(
        "--adapters", type=int, default=None, help="distinct adapters (default 100; --url: all)"
    )
    p.add_argument("--tenants", type=int, default=None, help="tenants owning them (default 100)")
    p.add_argument("--popularity", choices=POPULARITIES, default="zipf")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent")
    p.add_argument("--arrival", choices=ARRIVALS, default="poisson")
    p.add_argument("--cv", type=float, default=1.0, help="gap coefficient of variation (gamma)")
    p.add_argument("--inputs", type=int, default=1, help="texts per request")
    p.add_argument("--rate", type=float, default=20.0, help="offered requests/s (single run)")
    p.add_argument("--sweep", help="comma-separated rates, or 'auto'")
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="sending seconds per rate (default 10, with --scenarios 4; by default a low rate "
        "sends up to twice as long to collect 100 requests)",
    )
    p.add_argument(
        "--probe-seconds",
        type=float,
        default=None,
        help="closed-loop capacity probe before an auto sweep (default 2, --quick 1); its "
        "ratios are the targets table's 'closed loop' column",
    )
    p.add_argument("--requests", type=int, default=1_000_000, help="max requests per rate")
    p.add_argument("--timeout", type=float, default=5.0, help="queue deadline per request, s")
    p.add_argument("--slo-ms", type=float, default=report.DEFAULT_SLO_MS)


def _add_engine(p: argparse.ArgumentParser) -> None:
    """How graft (and, where it applies, every target) runs."""
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--device", default="cpu", help="where the models run: cpu or cuda[:n]")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="every target's weights and activations (bfloat16: CPUs with AVX512-BF16 or AMX)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: graft's and the bare backbone's Linear weights in int8 (CPU; not peft)",
    )
    p.add_argument(
        "--interlude-tokens",
        type=int,
        default=None,
        help="graft's short steps inside long ones: token budget (default by device; 0 = off)",
    )
    p.add_argument("--adapter-pages", type=int, default=1024)
    p.add_argument(
        "--lookahead-rows",
        type=int,
        default=None,
        help="graft's EngineConfig.lookahead_rows (default by device: 0 on CPU, 64 on CUDA)",
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="graft's steps captured in CUDA graphs and replayed (EngineConfig.cuda_graphs; "
        "default: the engine's, on with CUDA)",
    )
    p.add_argument(
        "--plan-ahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="graft's EngineConfig.plan_ahead: the next step planned while one runs "
        "(default: the engine's, on with CUDA)",
    )
    p.add_argument(
        "--contended-tokens",
        type=_contended,
        default="auto",
        help="graft's EngineConfig.contended_batch_tokens: auto (512 on CPU, off on CUDA), "
        "none or a token count",
    )
    p.add_argument(
        "--switch-interval-ms",
        type=float,
        default=None,
        help="graft's interpreter switch interval (EngineConfig.switch_interval_ms; default: "
        "the engine's, 0.5)",
    )


def _add_model(p: argparse.ArgumentParser) -> None:
    """Every target's encoder."""
    model = p.add_mutually_exclusive_group()
    model.add_argument(
        "--backbone", help="every target's encoder: a Hugging Face directory (default: MiniLM)"
    )
    model.add_argument(
        "--hidden",
        type=int,
        help="every target's encoder: a random-weight BERT of this width (768: BERT-base), "
        "with the packaged tokenizer",
    )
    p.add_argument("--layers", type=int, default=None, help="with --hidden: its depth (12)")


def _contended(value: str) -> int | str | None:
    """``--contended-tokens``: "auto", "none" or a positive token count."""
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        tokens = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, none or a token count, got {value!r}"
        ) from None
    if tokens < 1:
        raise argparse.ArgumentTypeError(f"a token count must be >= 1, got {tokens}")
    return tokens
