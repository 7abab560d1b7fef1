"""Options the ``graft`` commands share: the global ones, and the server's."""

import argparse
import os

DEFAULT_REGISTRY = "graft-registry"


def common_options(*, with_defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. Only the top level sets
    defaults: a subcommand's default would overwrite what was given before the command's
    name (``graft --registry X serve`` served ./graft-registry)."""

    def default(value: object) -> object:
        return value if with_defaults else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--registry",
        default=default(os.environ.get("GRAFT_REGISTRY") or DEFAULT_REGISTRY),  # "" too
        help="registry directory (default: $GRAFT_REGISTRY or ./graft-registry)",
    )
    common.add_argument(
        "--backbone",
        default=default(os.environ.get("GRAFT_BACKBONE") or None),  # "" is unset too
        help="Hugging Face encoder directory (default: $GRAFT_BACKBONE or the packaged MiniLM)",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=default(False), help="log at INFO level"
    )
    return common


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_BYTE_UNITS |= {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def byte_size(text: str) -> int:
    """A size as people write it: a number of bytes, or with a unit (``4GiB``, ``1.5 GB``)."""
    number = text.strip().rstrip("bBiIkKmMgGtT ")
    unit = text.strip()[len(number) :].strip().lower()
    try:
        value = float(number) * _BYTE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: a number of bytes, or one with a unit "
            f"({', '.join(u for u in _BYTE_UNITS if u)}), e.g. 4GiB"
        ) from None
    if not 1 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least 1 byte, and finite")
    return int(value)


def _whole_number(text: str, least: int, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least or (most is not None and value > most):
        bound = f"from {least} to {most}" if most is not None else f"{least} or more"
        raise argparse.ArgumentTypeError(f"{text!r}: must be {bound}")
    return value


def _non_negative(text: str) -> int:
    return _whole_number(text, 0)


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _port(text: str) -> int:
    return _whole_number(text, 0, 65535)  # 0: any free port


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive, finite number")
    return value


def serve_options(p: argparse.ArgumentParser) -> None:
    """What ``graft serve`` and ``graft demo`` take: the listener, the engine, training."""
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8080, help="0: any free port")
    p.add_argument(
        "--workers",
        type=_non_negative,
        default=0,
        help="front-end processes sharing the port: they parse, authenticate and tokenize "
        "classify requests for the engine's process (default 0: one process does all)",
    )
    p.add_argument("--max-batch-tokens", type=positive_int, default=8192)
    p.add_argument("--max-batch-rows", type=positive_int, default=128)
    pool = p.add_mutually_exclusive_group()
    pool.add_argument(
        "--adapter-pages",
        type=positive_int,
        default=None,
        help="device adapter pool, in rank-rows (default 1024 on the CPU; on CUDA, a tenth of "
        "the device's memory)",
    )
    pool.add_argument(
        "--adapter-pool-bytes",
        type=byte_size,
        default=None,
        help="device adapter pool in bytes instead (e.g. 4GiB, 512MiB, 1000000)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="capture step shapes in CUDA graphs and replay them (default: on with CUDA)",
    )
    p.add_argument(
        "--plan-ahead",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="plan the next step while one runs, once a step's worth of rows waits "
        "(default: on with CUDA)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="backbone and adapter pool precision (bfloat16: faster on CPUs with AVX512-BF16)",
    )
    p.add_argument(
        "--quantize",
        choices=("none", "int8"),
        default="none",
        help="int8: the backbone's frozen Linear weights in int8 (CPU, float32 only; "
        "faster, slightly different scores)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="torch threads of the model (default: every core)",
    )
    p.add_argument(
        "--train-jobs",
        type=positive_int,
        default=1,
        help="training jobs (POST /v1/train) run at once",
    )
    p.add_argument(
        "--train-threads", type=positive_int, default=1, help="torch threads per training job"
    )
    p.add_argument(
        "--train-max-minutes",
        type=_positive_number,
        default=60.0,
        help="a training job still running after this fails (jobs run one at a time)",
    )
    p.add_argument(
        "--train-max-upload-mb",
        type=_positive_number,
        default=20.0,
        help="largest POST /v1/train body",
    )
    p.add_argument(
        "--no-metrics",
        dest="metrics",
        action="store_false",
        help="do not serve GET /metrics (Prometheus; $GRAFT_METRICS_KEY, when set, is the "
        "bearer key scrapes must send)",
    )


def training_config(args: argparse.Namespace):
    """POST /v1/train's settings from ``--train-*`` (graft serve and graft demo alike)."""
    from server.train_routes import TrainServiceConfig

    return TrainServiceConfig(
        max_upload_bytes=int(args.train_max_upload_mb * 1024 * 1024),
        max_running=args.train_jobs,
        worker_threads=args.train_threads,
        max_job_seconds=args.train_max_minutes * 60,
    )
