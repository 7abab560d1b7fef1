"""``graft tenants ...`` and ``graft adapters ...``: registry administration commands."""

import argparse
import json
import sys


def open_registry(args: argparse.Namespace, *, create: bool = False):
    """The registry at ``--registry``. Only ``tenants create`` makes a new one: any other
    command at a mistyped path would have left an empty registry there and found nothing."""
    from registry import Registry

    if not create:
        require_registry(args.registry)
    return Registry(args.registry)


def require_registry(path: str) -> None:
    """ValueError unless ``path`` holds a registry (its catalog)."""
    from pathlib import Path

    from registry.registry import CATALOG_FILE

    if not (Path(path) / CATALOG_FILE).is_file():
        raise ValueError(
            f"no registry at {path}: create one with its first tenant "
            f"(graft tenants create NAME --registry {path})"
        )


def tenants_create(args: argparse.Namespace) -> int:
    from registry import validate_name

    validate_name("tenant", args.tenant)  # before a mistyped path becomes an empty registry
    with open_registry(args, create=True) as registry:
        key = registry.create_tenant(args.tenant)
        heading = f"created tenant {args.tenant!r}; its API key (shown once, stored hashed):"
        _show_key(registry, args.tenant, key, heading)
    return 0


def tenants_add_key(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        key = registry.issue_key(args.tenant)
        heading = f"new API key for tenant {args.tenant!r} (shown once, stored hashed):"
        _show_key(registry, args.tenant, key, heading)
    return 0


def _show_key(registry, tenant: str, key: str, heading: str) -> None:
    """Print a new key; one that could not be printed (stdout full, a closed pipe) is revoked
    again, since nobody holds it."""
    try:
        print(heading)
        print(key, flush=True)
    except OSError as exc:
        registry.revoke_key(tenant, key)
        raise OSError(f"could not print the new API key ({exc}); it is revoked again") from exc


def tenants_revoke_keys(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        if args.key_stdin:
            key = next((line.strip() for line in sys.stdin if line.strip()), "")  # first line
            if not key:
                raise ValueError("--key-stdin read no API key from standard input")
            registry.revoke_key(args.tenant, key)
            print(f"revoked one API key of tenant {args.tenant!r}")
        else:
            count = registry.revoke_keys(args.tenant)
            print(f"revoked {count} API key(s) of tenant {args.tenant!r}; issue one with add-key")
    return 0


def tenants_list(args: argparse.Namespace) -> int:
    with open_registry(args) as registry:
        settings = registry.tenant_settings()
        for tenant in registry.tenants():
            extra = json.dumps(settings[tenant], sort_keys=True) if tenant in settings else ""
            print(f"{tenant}  {extra}".rstrip())
    return 0


def tenants_set(args: argparse.Namespace) -> int:
    from engine import TenantPolicy
    from engine.tenant_settings import policy_from_settings

    changes = {
        "weight": args.weight,
        "max_tokens_per_step": args.max_tokens_per_step,
        "max_queued_rows": args.max_queued_rows,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.reset == bool(changes):
        raise ValueError(
            "give --reset, or at least one of --weight, --max-tokens-per-step, --max-queued-rows"
        )
    with open_registry(args) as registry:
        if args.reset:
            registry.set_tenant_settings(args.tenant, None)
            print(f"tenant {args.tenant!r} back to the server defaults")
            return 0
        # refuse values the scheduler would refuse; read and write in one transaction
        merged = registry.update_tenant_settings(
            args.tenant,
            changes,
            check=lambda merged: policy_from_settings(TenantPolicy(), merged, changing=changes),
        )
    print(f"tenant {args.tenant!r}: {json.dumps(merged, sort_keys=True)}")
    return 0


def tenants_delete(args: argparse.Namespace) -> int:
    """Without --yes, a dry run: says what would go and exits 1, deleting nothing."""
    with open_registry(args) as registry:
        records = registry.delete_tenant(args.tenant, dry_run=not args.yes)
    if not args.yes:
        print(
            f"would delete tenant {args.tenant!r}, its API keys and its {len(records)} adapter "
            "version(s), files included; repeat with --yes to delete"
        )
        return 1
    print(f"deleted tenant {args.tenant!r} and {len(records)} adapter version(s)")
    return 0


# adapters --------------------------------------------------------------------------------


def adapters_import(args: argparse.Namespace) -> int:
    from engine import load_backbone
    from engine.peft_io import import_peft_many

    if args.name and len(args.dirs) > 1:
        raise ValueError(
            "--name applies to a single DIR; with several, each takes its directory's name"
        )
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else None
    with open_registry(args) as registry:
        if not registry.has_tenant(args.tenant):
            raise ValueError(
                f"tenant {args.tenant!r} does not exist (graft tenants create {args.tenant})"
            )
        backbone = load_backbone(args.backbone)
        sources = [(args.name or src.resolve().name, src) for src in args.dirs]
        records, failures = import_peft_many(registry, backbone, args.tenant, sources, labels)
    for src, reason in failures:
        print(f"failed {src}: {reason}", file=sys.stderr)
    for record in records:
        print(
            f"imported {record.full_name}@{record.version} "
            f"(rank {record.rank}, labels {','.join(record.labels)})"
        )
    print(f"{len(records)} imported, {len(failures)} failed")
    return 1 if failures else 0


def adapters_list(args: argparse.Namespace) -> int:
    from engine.listing import summarize

    with open_registry(args) as registry:
        infos = summarize(registry.list_adapters(args.tenant), lambda key: "disk")
    if args.json:
        print(json.dumps([i.to_dict() for i in infos], indent=2))
        return 0
    header = (
        f"{'NAME':<20} {'LATEST':>6} {'VERSIONS':<10} {'RANK':>4} {'SIZE':>10}  "
        f"{'ACC':>6} {'F1':>6}  {'BASE':<12}  LABELS"
    )
    print(header)
    for i in infos:
        acc, f1 = i.metrics.get("accuracy"), i.metrics.get("macro_f1")
        latest = str(i.version) if i.is_latest else "none"  # what an unpinned request gets
        print(
            f"{i.name:<20} {latest:>6} {','.join(map(str, i.versions)):<10} {i.rank:>4} "
            f"{i.size_bytes:>10}  {_num(acc):>6} {_num(f1):>6}  {i.base_sha256[:12]:<12}  "
            f"{','.join(i.labels)}"
        )
    return 0


def adapters_promote(args: argparse.Namespace) -> int:
    from registry import parse_model_ref

    ref = parse_model_ref(args.ref)
    if ref.tenant is None or ref.version is None:
        raise ValueError(f"expected TENANT/NAME@VERSION (e.g. acme/spam@2), got {args.ref!r}")
    with open_registry(args) as registry:
        record = registry.promote(ref.tenant, ref.name, ref.version)
    print(f"{record.full_name}: latest is now version {record.version}")
    return 0


def adapters_rollback(args: argparse.Namespace) -> int:
    from registry import parse_model_ref

    ref = parse_model_ref(args.ref)
    if ref.tenant is None or ref.version is not None:
        raise ValueError(f"expected TENANT/NAME (e.g. acme/spam), got {args.ref!r}")
    with open_registry(args) as registry:
        left, record = registry.rollback(ref.tenant, ref.name)
    print(f"{record.full_name}: rolled back from version {left} to {record.version}")
    return 0


def adapters_delete(args: argparse.Namespace) -> int:
    """Without --yes, a dry run: says what would go and exits 1, deleting nothing."""
    from registry import parse_model_ref

    ref = parse_model_ref(args.ref)
    if ref.tenant is None:
        raise ValueError(f"expected TENANT/NAME[@VERSION] (e.g. acme/spam@2), got {args.ref!r}")
    with open_registry(args) as registry:
        records = registry.delete(ref.tenant, ref.name, ref.version, dry_run=not args.yes)
    versions = ", ".join(str(record.version) for record in records)
    if not args.yes:
        print(
            f"{ref.tenant}/{ref.name}: would delete version(s) {versions}, files included; "
            "repeat with --yes to delete"
        )
        return 1
    print(f"{ref.tenant}/{ref.name}: deleted version(s) {versions}")
    return 0


def _num(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"
