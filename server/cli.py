"""The ``graft`` command line: tenants, training, adapters, serving, the demo."""

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from server import cli_admin as admin
from server.cli_args import common_options, positive_int, serve_options, training_config


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the backbone is always a local directory
    _quiet_transformers()
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, LookupError, OSError) as exc:  # our errors subclass these or RegistryError
        print(f"graft: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        import sqlite3

        from engine import EngineError
        from registry import RegistryError
        from server.workers import FrontEndsFailed

        if isinstance(exc, RegistryError | EngineError | FrontEndsFailed):
            print(f"graft: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, sqlite3.Error):  # "database is locked": another writer held on
            print(f"graft: error: the registry's catalog: {exc}", file=sys.stderr)
            return 2
        raise


def _quiet_transformers() -> None:
    """Weight-loading bars and load reports are noise in a CLI that prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _parser() -> argparse.ArgumentParser:
    common = common_options(with_defaults=False)
    parser = argparse.ArgumentParser(
        prog="graft",
        parents=[common_options(with_defaults=True)],
        description="One frozen backbone, a thousand custom classifiers.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tenants = sub.add_parser("tenants", help="manage tenants and API keys").add_subparsers(
        dest="action", required=True
    )
    p = tenants.add_parser(
        "create", parents=[common], help="create a tenant; prints its API key last"
    )
    p.add_argument("tenant")
    p.set_defaults(handler=admin.tenants_create)
    p = tenants.add_parser("add-key", parents=[common], help="issue another API key for a tenant")
    p.add_argument("tenant")
    p.set_defaults(handler=admin.tenants_add_key)
    p = tenants.add_parser(
        "revoke-keys",
        parents=[common],
        help="revoke every API key of a tenant, or with --key-stdin the one key read from "
        "stdin; running servers refuse it on its next request",
    )
    p.add_argument("tenant")
    p.add_argument(
        "--key-stdin",
        action="store_true",
        help="revoke only the key given on stdin (not argv, where ps shows it)",
    )
    p.set_defaults(handler=admin.tenants_revoke_keys)
    p = tenants.add_parser("list", parents=[common], help="list tenants and their settings")
    p.set_defaults(handler=admin.tenants_list)
    p = tenants.add_parser(
        "set",
        parents=[common],
        help="change a tenant's scheduling share; running servers apply it within seconds",
    )
    p.add_argument("tenant")
    p.add_argument("--weight", type=float, help="share relative to other waiting tenants")
    p.add_argument("--max-tokens-per-step", type=int, help="tokens it may put in one step")
    p.add_argument("--max-queued-rows", type=int, help="inputs it may have waiting (then 429)")
    p.add_argument("--reset", action="store_true", help="back to the server's defaults")
    p.set_defaults(handler=admin.tenants_set)
    p = tenants.add_parser(
        "delete",
        parents=[common],
        help="delete a tenant: its keys, settings and every adapter version, files included",
    )
    p.add_argument("tenant")
    p.add_argument(
        "--yes", action="store_true", help="delete; without it, say what would go (exit 1)"
    )
    p.set_defaults(handler=admin.tenants_delete)

    _train_parser(sub, common)

    adapters = sub.add_parser(
        "adapters", help="import, list, promote, roll back and delete adapters"
    ).add_subparsers(dest="action", required=True)
    p = adapters.add_parser(
        "import", parents=[common], help="register PEFT adapter directories (task_type=SEQ_CLS)"
    )
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    p.add_argument("--tenant", required=True)
    p.add_argument("--name", help="model name (one DIR only; default: the directory's name)")
    p.add_argument("--labels", help="comma-separated labels, in the classifier's output order")
    p.set_defaults(handler=admin.adapters_import)
    p = adapters.add_parser("list", parents=[common], help="list a tenant's models")
    p.add_argument("--tenant", required=True)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=admin.adapters_list)
    p = adapters.add_parser(
        "promote", parents=[common], help="make a version the one a name serves (acme/spam@2)"
    )
    p.add_argument("ref", metavar="TENANT/NAME@VERSION")
    p.set_defaults(handler=admin.adapters_promote)
    p = adapters.add_parser(
        "rollback", parents=[common], help="serve the version promoted before the current one"
    )
    p.add_argument("ref", metavar="TENANT/NAME")
    p.set_defaults(handler=admin.adapters_rollback)
    p = adapters.add_parser(
        "delete",
        parents=[common],
        help="delete one version (acme/spam@2) or every version of a name (acme/spam)",
    )
    p.add_argument("ref", metavar="TENANT/NAME[@VERSION]")
    p.add_argument(
        "--yes", action="store_true", help="delete; without it, say what would go (exit 1)"
    )
    p.set_defaults(handler=admin.adapters_delete)

    p = sub.add_parser("serve", parents=[common], help="serve the HTTP API")
    serve_options(p)
    p.set_defaults(handler=_serve)
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="train the demo classifiers if missing, serve, answer examples",
    )
    serve_options(p)
    p.set_defaults(handler=_demo)
    from server.bench_cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def _train_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from training import MODES, WEIGHTS_DTYPES, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        parents=[common],
        help="validate data, train a head, LoRA + head or a full model; register head/lora",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default=d.mode,
        help="head: only the head on frozen embeddings; lora: LoRA + head (default); "
        "full: every weight, written to --output and never registered",
    )
    p.add_argument("--tenant", help="the tenant to register for (head, lora)")
    p.add_argument("--name", help="model name (default for full: the --output directory's name)")
    p.add_argument("--output", type=Path, help="full mode: the model directory to create")
    p.add_argument("--data", required=True, type=Path, help="CSV, TSV or JSONL with text and label")
    p.add_argument("--epochs", type=int, default=d.epochs, help="lora and full")
    p.add_argument("--head-epochs", type=int, default=d.head_epochs, help="head mode")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--lr", type=float, default=d.lora_lr, help="LoRA learning rate")
    p.add_argument("--head-lr", type=float, default=d.head_lr)
    p.add_argument(
        "--backbone-lr", type=float, default=d.backbone_lr, help="full mode: encoder learning rate"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per text")
    p.add_argument("--eval-fraction", type=float, default=d.eval_fraction)
    p.add_argument("--patience", type=int, default=d.patience)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--max-examples",
        type=int,
        default=None,
        help="train on a stratified sample of this many rows",
    )
    p.add_argument(
        "--targets",
        default="",
        help="comma-separated linear-name suffixes (default: all but the pooler)",
    )
    p.add_argument(
        "--weights-dtype",
        choices=WEIGHTS_DTYPES,
        default=d.weights_dtype,
        help="head, lora: how the weights are stored (float16: half the bytes a cold load "
        "reads; float32 where a weight overflows float16)",
    )
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_train)


# training --------------------------------------------------------------------------------


def _train_config(args: argparse.Namespace):
    """The flags as a TrainConfig; its errors say the flag (``--lr``), not the field."""
    from training import TrainConfig

    try:
        return TrainConfig(
            mode=args.mode,
            rank=args.rank,
            alpha=args.alpha,
            epochs=args.epochs,
            head_epochs=args.head_epochs,
            batch_size=args.batch_size,
            lora_lr=args.lr,
            head_lr=args.head_lr,
            backbone_lr=args.backbone_lr,
            max_length=args.max_length,
            eval_fraction=args.eval_fraction,
            patience=args.patience,
            seed=args.seed,
            max_examples=args.max_examples,
            weights_dtype=args.weights_dtype,
            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        )
    except ValueError as exc:  # "lora_lr must be > 0 and finite, got 0.0"
        field, must, rest = str(exc).partition(" must ")
        if not must or not field.isidentifier():
            raise
        flag = "--lr" if field == "lora_lr" else "--" + field.replace("_", "-")
        raise ValueError(f"{flag} must {rest}") from None


def _train(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from engine import load_backbone
    from training import load_examples, train_adapter

    config = _train_config(args)
    is_full = config.mode == "full"
    if is_full and args.output is None:
        raise ValueError("--mode full writes a standalone model directory: give --output DIR")
    if not is_full and (args.tenant is None or args.name is None):
        raise ValueError(f"--mode {config.mode} registers a model: give --tenant and --name")
    if args.threads:
        torch.set_num_threads(args.threads)
    examples = load_examples(args.data)
    opened = contextlib.nullcontext() if is_full else admin.open_registry(args)
    with opened as registry:
        if registry is not None and not registry.has_tenant(args.tenant):
            raise ValueError(
                f"tenant {args.tenant!r} does not exist (graft tenants create {args.tenant})"
            )
        backbone = load_backbone(args.backbone)
        result = train_adapter(
            backbone,
            registry,
            args.tenant or "",
            args.name if args.name is not None else args.output.name,
            examples,
            config,
            source=str(args.data),
            progress=not args.no_progress,
            on_report=lambda report: print(report.format(), flush=True),
            output_dir=args.output,
        )
    if result.record is not None:
        print(f"registered {result.record.full_name}@{result.record.version} ({config.mode})")
        print(f"  adapter size:   {result.adapter_bytes} bytes")
    else:
        print(f"wrote the full model to {result.model_dir} (not registered, not served)")
        print(f"  directory size: {result.adapter_bytes} bytes")
    metrics = result.metrics
    print(f"  training time:  {result.train_seconds:.1f} s ({result.epochs_run} epochs)")
    print(
        f"  held-out ({metrics['num_examples']} rows): accuracy {metrics['accuracy']:.4f}, "
        f"macro-F1 {metrics['macro_f1']:.4f}"
    )
    return 0


# serving ---------------------------------------------------------------------------------


def engine_config(args: argparse.Namespace):
    from engine import EngineConfig

    return EngineConfig(
        registry_dir=args.registry,
        backbone_dir=args.backbone,
        device=args.device,
        dtype=args.dtype,
        quantize=args.quantize,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_rows=args.max_batch_rows,
        adapter_pages=args.adapter_pages,
        adapter_pool_bytes=args.adapter_pool_bytes,
        num_threads=args.threads,  # None: EngineConfig.intra_op_threads (every core)
        cuda_graphs=args.cuda_graphs,
        plan_ahead=args.plan_ahead,
    )


def _serve(args: argparse.Namespace) -> int:
    from server.app import metrics_key_from_env, run_server
    from server.cli_admin import require_registry

    require_registry(args.registry)  # a mistyped path would serve a new, empty registry
    config = engine_config(args)
    bound: list[str] = []  # the URL the socket got (its real port when --port is 0)

    async def listening(url: str) -> None:
        bound.append(url)

    async def announce(engine) -> None:
        print(
            f"graft serving on {bound[0]} "
            f"(backbone {engine.backbone.name}, registry {args.registry})",
            flush=True,
        )

    from server.demo import _run

    _run(
        run_server(
            config,
            args.host,
            args.port,
            on_listening=listening,
            on_ready=announce,
            training=training_config(args),
            metrics=args.metrics,
            metrics_key=metrics_key_from_env(),
            workers=args.workers,
        )
    )
    return 0


def _demo(args: argparse.Namespace) -> int:
    from server.demo import run_demo

    return run_demo(args, engine_config(args))


if __name__ == "__main__":
    sys.exit(main())
