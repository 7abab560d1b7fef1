"""PEFT-format adapter directories: written by graft's training, imported from elsewhere."""

import json
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from engine.adapters import (
    POOLING_CLS_POOLER,
    POOLING_FIRST,
    POOLINGS,
    AdapterWeights,
    classifies_in_two_layers,
    config_alpha,
    has_two_layer_head,
    parse_adapter,
    pattern_value,
    peft_key,
    two_layer_activation,
)
from engine.backbone import Backbone
from engine.errors import AdapterFormatError
from registry import AdapterRecord, PublishItem, Registry, validate_name
from registry.errors import InvalidAdapter
from registry.manifest import MANIFEST_FILE, check_manifest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLED = ("adapter_model.bin", "pytorch_model.bin", "adapter_model.pt")


def write_peft_adapter(
    out_dir: Path,
    backbone: Backbone,
    modules: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    rank: int,
    alpha: float,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write ``modules`` (backbone linear name -> (A [r, in], B [out, r])) and the head in
    the layout PEFT saves for ``task_type=SEQ_CLS``, so PEFT can load the LoRA part.

    Every tensor is stored as ``dtype``; ValueError if one does not fit it (float16 tops out
    at 65,504), before anything is written."""
    prefix = "base_model.model." + (backbone.base_prefix + "." if backbone.base_prefix else "")
    named = {
        f"{prefix}{name}.lora_{part}.weight": t
        for name, ab in modules.items()
        for part, t in zip("AB", ab, strict=True)
    }
    named["base_model.model.classifier.weight"] = head_weight
    named["base_model.model.classifier.bias"] = head_bias
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in named.items():
        stored = tensor.detach().to("cpu", dtype).contiguous()
        if not torch.isfinite(stored).all():
            raise ValueError(f"{key} holds values too large for {dtype}")
        tensors[key] = stored
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": str(backbone.path),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        # whole names: a suffix ("dense") would have PEFT wrap modules without factors too
        "target_modules": sorted(peft_key(backbone, name) for name in modules),
        "modules_to_save": ["classifier"],
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))


def read_labels(src: Path, labels: Sequence[str] | None) -> tuple[str, ...]:
    """Labels from the caller, else the directory's ``config.json`` id2label, else labels.txt."""
    if labels:
        return tuple(labels)
    hf_config = src / "config.json"
    if hf_config.is_file():
        id2label = _json_object(hf_config.read_bytes(), f"{hf_config}").get("id2label") or {}
        if not isinstance(id2label, dict) or not all(_is_index(k) for k in id2label):
            raise AdapterFormatError(f"{hf_config}: id2label must map class indices to labels")
        # the head's row i is index i: a gap, a 1-based map or "0" and "00" would shift labels
        if sorted(int(k) for k in id2label) != list(range(len(id2label))):
            raise AdapterFormatError(
                f"{hf_config}: id2label must number its classes 0 to {len(id2label) - 1}, each once"
            )
        ordered = [str(id2label[k]) for k in sorted(id2label, key=int)]
        if ordered and not all(v == f"LABEL_{i}" for i, v in enumerate(ordered)):
            return tuple(ordered)
    labels_txt = src / "labels.txt"
    if labels_txt.is_file():
        found = tuple(line.strip() for line in labels_txt.read_text().splitlines() if line.strip())
        if not found:
            raise AdapterFormatError(f"{labels_txt} lists no labels (one per line)")
        return found
    raise AdapterFormatError(
        f"{src}: no labels found (config.json id2label or labels.txt); pass --labels"
    )


def _check_as_peft_would(
    src: Path, backbone: Backbone, config: Mapping[str, Any], weights: AdapterWeights
) -> None:
    """What the engine reads from the weights alone, checked against the config PEFT reads:
    a LoRA rank that differs from ``r`` (or ``rank_pattern``) makes PEFT refuse the files, and
    graft would scale the update by the weights' rank, not the config's; weights of a module
    the config does not target PEFT never applies. Non-finite values would answer null
    scores."""
    for name, module in weights.modules.items():
        key = peft_key(backbone, name)
        if not _targeted(config, key):
            raise AdapterFormatError(
                f"{src / CONFIG_FILE} does not target {key} (target_modules, exclude_modules, "
                "layers_to_transform), so PEFT would not apply the weights the file holds for it"
            )
        rank = pattern_value(key, config, "r", "rank_pattern")
        rank = 8 if rank is None else rank  # PEFT's default
        if rank != module.a.shape[0]:
            raise AdapterFormatError(
                f"{src / CONFIG_FILE} says r={rank!r} for {name}, but its weights have rank "
                f"{module.a.shape[0]}"
            )
        alpha = config_alpha(key, config)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise AdapterFormatError(
                f"{src / CONFIG_FILE}: lora_alpha for {name} must be a number, got {alpha!r}"
            )
    named = [(f"{name}'s LoRA A", m.a) for name, m in weights.modules.items()]
    named += [(f"{name}'s LoRA B", m.b) for name, m in weights.modules.items()]
    named += [("the head", tensor) for tensor in weights.head.tensors()]
    for label, tensor in named:
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterFormatError(f"{src / WEIGHTS_FILE}: {label} holds NaN or infinity")


def _targeted(config: Mapping[str, Any], key: str) -> bool:
    """Whether PEFT wraps the module named ``key`` for this config (PEFT 0.17-0.21's rules):
    ``exclude_modules`` first, then ``target_modules`` as a regex (a string, matched whole) or
    as names and name suffixes (a list), which ``layers_to_transform`` narrows to some layers.
    A config without ``target_modules`` takes PEFT's defaults for the model type, which
    graft does not keep: refused (PEFT itself always saves the list it resolved)."""
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and _fullmatch(exclude, key, "exclude_modules"):
        return False
    if isinstance(exclude, list) and _named(exclude, key):
        return False
    target = config.get("target_modules")
    if target is None:
        raise AdapterFormatError(
            f"{CONFIG_FILE}: target_modules is null, so PEFT would pick its defaults for the "
            "model type; save the adapter with the modules it targets"
        )
    layered = config.get("layers_to_transform") not in (None, [])
    if config.get("layers_pattern") and not layered:  # as PEFT's LoraConfig refuses them
        raise AdapterFormatError(f"{CONFIG_FILE}: layers_pattern needs layers_to_transform")
    if isinstance(target, str) and layered:
        raise AdapterFormatError(
            f"{CONFIG_FILE}: layers_to_transform cannot narrow a target_modules string"
        )
    if target == "all-linear":  # every Linear but the head
        return True
    if isinstance(target, str):
        return _fullmatch(target, key, "target_modules")
    if not isinstance(target, list) or not all(isinstance(t, str) for t in target):
        raise AdapterFormatError(f"{CONFIG_FILE}: target_modules must be a string or a list")
    if not _named(target, key):
        return False
    return key in target or _in_layers(config, key)


def _named(names: list[str], key: str) -> bool:
    return key in names or any(key.endswith(f".{name}") for name in names)


def _in_layers(config: Mapping[str, Any], key: str) -> bool:
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    if not _is_int(layers) and not (isinstance(layers, list) and all(map(_is_int, layers))):
        raise AdapterFormatError(f"{CONFIG_FILE}: layers_to_transform must be an integer or a list")
    patterns = config.get("layers_pattern") or None
    if patterns is not None and not isinstance(patterns, str | list):
        raise AdapterFormatError(f"{CONFIG_FILE}: layers_pattern must be a string or a list")
    if patterns is None:  # the first numbered segment is the layer
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        found = None
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            if not isinstance(pattern, str):
                raise AdapterFormatError(f"{CONFIG_FILE}: layers_pattern must hold strings")
            try:
                found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            except re.error as exc:
                message = f"{CONFIG_FILE}: layers_pattern {pattern!r} is not a valid pattern: {exc}"
                raise AdapterFormatError(message) from None
            if found is not None:
                break
    if found is None:
        return False
    index = int(found.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fullmatch(pattern: str, key: str, field: str) -> bool:
    try:
        return re.fullmatch(pattern, key) is not None
    except re.error as exc:
        raise AdapterFormatError(
            f"{CONFIG_FILE}: {field} {pattern!r} is not a valid pattern: {exc}"
        ) from None


def _json_object(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise AdapterFormatError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{where} must hold a JSON object")
    return value


def stage_peft_import(
    src: Path, backbone: Backbone, labels: Sequence[str] | None, staging: Path
) -> dict[str, Any]:
    """Validate a PEFT directory against the backbone and copy its two files into ``staging``.

    Returns the manifest for the registry. Nothing is written when validation fails.
    """
    if not src.is_dir():
        raise AdapterFormatError(f"{src}: not a directory")
    for name in _PICKLED:
        if (src / name).exists() and not (src / WEIGHTS_FILE).exists():
            raise AdapterFormatError(
                f"{src}/{name}: pickled weights are never loaded; save with safetensors"
            )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise AdapterFormatError(f"{src}: missing {name}")
    config_bytes = (src / CONFIG_FILE).read_bytes()
    weights_bytes = (src / WEIGHTS_FILE).read_bytes()
    graft = _graft_manifest(src, backbone)
    found = read_labels(src, labels or (graft or {}).get("labels"))
    if len(set(found)) != len(found):
        raise AdapterFormatError(f"{src}: labels must be distinct, got {list(found)}")
    config = _json_object(config_bytes, f"{src / CONFIG_FILE}")
    task = config.get("task_type")
    if task not in (None, "SEQ_CLS"):
        raise AdapterFormatError(f"{src}: task_type is {task!r}; only SEQ_CLS adapters classify")
    if graft is not None:  # graft's own version: its head reads what its manifest says
        pooling, activation = graft["pooling"], graft.get("head_activation")
    elif has_two_layer_head(weights_bytes, backbone):
        # a two-layer head (DistilBERT's, RoBERTa's, ELECTRA's) reads the first token's
        # hidden state, not BERT's [CLS] pooler
        activation, pooling = two_layer_activation(backbone), POOLING_FIRST
    elif classifies_in_two_layers(backbone) and not backbone.has_pooler:
        raise AdapterFormatError(
            f"{src}: the adapter holds one layer of its head, but a {backbone.model_type} "
            "classification head runs another before it, which PEFT saves only when "
            "modules_to_save names it (DeBERTa: modules_to_save=['classifier', 'pooler'])"
        )
    else:
        activation, pooling = None, POOLING_CLS_POOLER
    weights = parse_adapter(config_bytes, weights_bytes, found, pooling, backbone, activation)
    _check_as_peft_would(src, backbone, config, weights)
    (staging / CONFIG_FILE).write_bytes(config_bytes)
    (staging / WEIGHTS_FILE).write_bytes(weights_bytes)
    return {
        "labels": list(found),
        "base_sha256": backbone.sha256,
        "rank": weights.rank,
        "pooling": pooling,
        **({"head_activation": activation} if activation else {}),
        "source": "peft-import" if graft is None else "graft-import",
        "imported_from": src.name,
        "peft_version": config.get("peft_version"),
        "target_modules": sorted(weights.modules),
        "metrics": {},
    }


def _graft_manifest(src: Path, backbone: Backbone) -> dict[str, Any] | None:
    """The manifest of a graft version directory (another registry's, a copy), else None.
    Its head's pooling is not in the PEFT files: graft trains mean pooling, which read as
    PEFT's [CLS] pooler would serve other answers without a word."""
    path = src / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = _json_object(path.read_bytes(), f"{path}")
    try:
        fields = check_manifest(manifest)
    except InvalidAdapter as exc:
        raise AdapterFormatError(f"{path}: {exc}") from None
    if fields.base_sha256 != backbone.sha256:
        raise AdapterFormatError(
            f"{path}: trained on base model {fields.base_sha256[:12]}..., not this backbone "
            f"({backbone.sha256[:12]}...)"
        )
    if manifest.get("pooling") not in POOLINGS:
        raise AdapterFormatError(f"{path}: pooling must be one of {POOLINGS}")
    return {**manifest, "labels": list(fields.labels)}


def import_peft(
    registry: Registry,
    backbone: Backbone,
    tenant: str,
    name: str,
    src: Path,
    labels: Sequence[str] | None = None,
) -> AdapterRecord:
    """Register a PEFT adapter directory as the next version of ``tenant/name``."""
    staging = Path(tempfile.mkdtemp(prefix="graft-import-"))
    try:
        manifest = stage_peft_import(Path(src), backbone, labels, staging)
        return registry.publish(tenant, name, staging, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_IMPORT_CHUNK = 500  # adapters per registry transaction in a bulk import


def import_peft_many(
    registry: Registry,
    backbone: Backbone,
    tenant: str,
    sources: Sequence[tuple[str, Path]],
    labels: Sequence[str] | None = None,
) -> tuple[list[AdapterRecord], list[tuple[Path, str]]]:
    """Register many PEFT directories: (name, dir) pairs, validated one by one, published in
    transactions of a few hundred. Returns the records and (dir, reason) for each failure; a
    bad directory never stops the others."""
    records: list[AdapterRecord] = []
    failures: list[tuple[Path, str]] = []
    staging_root = Path(tempfile.mkdtemp(prefix="graft-import-"))
    try:
        items: list[tuple[Path, PublishItem]] = []
        for i, (name, src) in enumerate(sources):
            staging = staging_root / str(i)
            staging.mkdir()
            try:
                validate_name("adapter", name)
                manifest = stage_peft_import(Path(src), backbone, labels, staging)
                check_manifest(manifest)  # here, not in the shared transaction: see below
            except Exception as exc:  # reported per directory; the rest still import
                failures.append((Path(src), str(exc)))
                continue
            items.append((Path(src), PublishItem(tenant, name, staging, manifest)))
        for start in range(0, len(items), _IMPORT_CHUNK):
            chunk = items[start : start + _IMPORT_CHUNK]
            try:
                records += registry.publish_many([item for _, item in chunk])
            except Exception as exc:  # the whole transaction failed (the disk, a race): nothing
                failures += [(src, str(exc)) for src, _ in chunk]  # of it landed
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return records, failures


def _is_index(key: object) -> bool:
    """A class index as config.json writes it: ASCII digits ("²" passes isdigit, not int)."""
    text = str(key)
    return text.isascii() and text.isdigit() and len(text) <= 18
