"""Reading a PEFT-format adapter into tensors checked against the backbone.

An adapter is ``adapter_config.json`` + ``adapter_model.safetensors`` as Hugging Face PEFT
writes them for ``task_type=SEQ_CLS`` (LoRA on the base, classifier through
``modules_to_save``), so adapters trained with PEFT load unchanged.
"""

import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.adapter_layout import adapter_layout, view_tensors
from engine.backbone import Backbone
from engine.errors import AdapterFormatError

POOLING_CLS_POOLER = "cls_pooler"  # BertForSequenceClassification: tanh pooler over [CLS]
POOLING_MEAN = "mean"  # mean of the last hidden states over real tokens
POOLING_FIRST = "first"  # the first token's last hidden state, which two-layer heads read
_MAX_SCALE = float(torch.finfo(torch.float32).max)  # a LoRA scale a step can hold
POOLINGS = (POOLING_CLS_POOLER, POOLING_MEAN, POOLING_FIRST)
# a two-layer head's activation between its layers: DistilBERT's ReLU, RoBERTa's tanh,
# ELECTRA's GELU (exact, as transformers' "gelu")
HEAD_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": torch.nn.functional.gelu,
}


# model types whose sequence-classification head has two layers, and the activation between
# them as transformers builds it (ELECTRA's is gelu whatever its config's hidden_act says)
_TWO_LAYER_HEADS = {
    "distilbert": "relu",
    "roberta": "tanh",
    "xlm-roberta": "tanh",
    "xlm-roberta-xl": "tanh",
    "camembert": "tanh",
    "data2vec-text": "tanh",
    "mpnet": "tanh",
    "electra": "gelu",
    # DeBERTa's ContextPooler (pooler.dense, then its config's pooler_hidden_act)
    "deberta": None,
    "deberta-v2": None,
}


# PEFT initialisations that subtract the adapter's starting update from the base weights
_INITS_REWRITING_THE_BASE = ("pissa", "olora", "corda", "loftq", "lora_ga")


def backbone_poolings(backbone: Backbone) -> tuple[str, ...]:
    """The poolings heads may read on this backbone: the mean always, its [CLS] pooler where
    it has one, the first token where its model type's classification heads have two layers
    (only those need it, so other backbones neither pool nor cache it)."""
    poolings = [POOLING_MEAN]
    if backbone.has_pooler:
        poolings.append(POOLING_CLS_POOLER)
    if classifies_in_two_layers(backbone):
        poolings.append(POOLING_FIRST)
    return tuple(poolings)


def two_layer_activation(backbone: Backbone) -> str:
    """The activation between the two layers of the backbone's classification head (an
    imported adapter's head is trained for it); AdapterFormatError where graft does not know
    it."""
    model_type = backbone.model_type
    activation = _TWO_LAYER_HEADS.get(model_type)
    if model_type in _TWO_LAYER_HEADS and activation is None:  # the config says
        activation = getattr(backbone.model.config, "pooler_hidden_act", None)
    if activation not in HEAD_ACTIVATIONS:
        raise AdapterFormatError(
            f"the classification head has two layers, and graft does not know the activation "
            f"between them for model_type {model_type!r} (it serves DistilBERT's, the RoBERTa "
            f"family's, ELECTRA's and DeBERTa's with {', '.join(HEAD_ACTIVATIONS)})"
        )
    return activation


def classifies_in_two_layers(backbone: Backbone) -> bool:
    """Whether the backbone's model type classifies through two layers (see _TWO_LAYER_HEADS)."""
    return backbone.model_type in _TWO_LAYER_HEADS


@dataclass(frozen=True, slots=True)
class LoraModule:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # alpha / r, or alpha / sqrt(r) with rsLoRA


# where one module's factors sit in a packed buffer: (rank, scale, A's offset, A's row stride,
# in, B^T's offset, B^T's row stride, out); offsets and strides in elements
ModuleSpan = tuple[int, float, int, int, int, int, int, int]


class PackedModules(Mapping[str, LoraModule]):
    """An adapter's LoRA factors as views of one packed host buffer, made when asked for.

    Views made once and kept would cost three Python objects per module, and the cycle
    collector walks every one of them on each full pass, with every thread stopped: a host tier
    of 1,000 adapters held 117k such objects and one pass took 87 ms. This mapping is three
    objects per adapter; each lookup makes fresh views (a few microseconds).
    """

    __slots__ = ("_buffer", "_spans")

    def __init__(self, buffer: torch.Tensor, spans: Mapping[str, ModuleSpan]) -> None:
        self._buffer = buffer  # 1-D, contiguous; span offsets count from its first element
        self._spans = dict(spans)

    def __getitem__(self, name: str) -> LoraModule:
        rank, scale, a0, a_stride, n_in, b0, b_stride, n_out = self._spans[name]
        base = self._buffer.storage_offset()  # as_strided counts from the storage's start
        a = self._buffer.as_strided((rank, n_in), (a_stride, 1), base + a0)
        b_t = self._buffer.as_strided((rank, n_out), (b_stride, 1), base + b0)
        return LoraModule(a=a, b=b_t.t(), scale=scale)

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)

    def ranks_and_scales(self) -> Iterator[tuple[str, int, float]]:
        """(module, rank, scale) of every module, without making views."""
        for name, span in self._spans.items():
            yield name, span[0], span[1]

    def fill(self, source: Mapping[str, LoraModule]) -> None:
        """Copy each module's A and B into its span: in numpy where both sides are host
        tensors of a type numpy has, since each torch copy gives up the interpreter lock,
        and a loader thread beside a busy event loop waits up to a switch interval to take
        it back. numpy keeps the lock for copies this small (under ~10k values)."""
        flat = self._buffer.numpy() if _numpy_ready(self._buffer) else None
        for name, module in source.items():
            if flat is None or not (_numpy_ready(module.a) and _numpy_ready(module.b)):
                view = self[name]
                view.a.copy_(module.a)
                view.b.copy_(module.b)
                continue
            rank, _, a0, a_stride, n_in, b0, b_stride, n_out = self._spans[name]
            item = flat.itemsize
            a = np.lib.stride_tricks.as_strided(flat[a0:], (rank, n_in), (a_stride * item, item))
            b_t = np.lib.stride_tricks.as_strided(flat[b0:], (rank, n_out), (b_stride * item, item))
            with np.errstate(over="ignore"):  # past float16's range: inf, as torch gives
                a[...] = module.a.numpy()
                b_t[...] = module.b.numpy().T


def _numpy_ready(tensor: torch.Tensor) -> bool:
    return (
        tensor.dtype in _NUMPY_DTYPES and tensor.device.type == "cpu" and not tensor.requires_grad
    )


# float64 stays with torch, which rounds it to float16 through float32 as ``half()`` does
_NUMPY_DTYPES = frozenset({torch.float32, torch.float16})


def ranks_and_scales(modules: Mapping[str, LoraModule]) -> Iterator[tuple[str, int, float]]:
    """(module, rank, scale) for each module of an adapter, packed or not."""
    if isinstance(modules, PackedModules):
        yield from modules.ranks_and_scales()
        return
    for name, module in modules.items():
        yield name, module.a.shape[0], module.scale


@dataclass(frozen=True, slots=True)
class Head:
    pooling: str  # one of POOLINGS
    weight: torch.Tensor  # [C, H]
    bias: torch.Tensor  # [C]
    # a two-layer head's first layer (DistilBERT's pre_classifier, RoBERTa's and ELECTRA's
    # classifier.dense), applied with ``activation`` to the pooled vector before ``weight``
    pre_weight: torch.Tensor | None = None  # [H, H]
    pre_bias: torch.Tensor | None = None  # [H]
    activation: str | None = None  # a key of HEAD_ACTIVATIONS

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of the head, in a fixed order (``with_tensors`` takes them back)."""
        pre = [self.pre_weight, self.pre_bias] if self.pre_weight is not None else []
        return [self.weight, self.bias, *pre]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> "Head":
        """This head over other tensors (copies, views, another device), in ``tensors()``
        order."""
        pre = (tensors[2], tensors[3]) if self.pre_weight is not None else (None, None)
        return Head(self.pooling, tensors[0], tensors[1], *pre, activation=self.activation)

    def features(self, pooled: torch.Tensor) -> torch.Tensor:
        """What the last layer reads: ``pooled`` itself, or through the first layer."""
        if self.pre_weight is None:
            return pooled
        act = HEAD_ACTIVATIONS[self.activation or ""]
        return act(torch.nn.functional.linear(pooled, self.pre_weight, self.pre_bias))


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """One adapter version, validated, on the host: what the memory manager pages in."""

    modules: Mapping[str, LoraModule]  # backbone linear name -> LoRA factors
    head: Head
    labels: tuple[str, ...]
    rank: int  # max rank over modules, 0 for a head-only model
    # [rank, width]: every module's rows laid out as one row of the device pool, so a page-in
    # is one copy (AdapterMemory.pack makes it; the modules are then views into it), or None
    rows: torch.Tensor | None = None

    @property
    def num_bytes(self) -> int:
        """Bytes as held now (a float16 file's factors count two bytes each until packed)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def _tensors(self) -> list[torch.Tensor]:
        tensors = self.head.tensors()
        if self.rows is not None:
            tensors.append(self.rows)
        else:
            for m in self.modules.values():
                tensors += [m.a, m.b]
        return tensors


def has_two_layer_head(weights_bytes: bytes | bytearray, backbone: Backbone) -> bool:
    """Whether the file's head has a first layer (checked against the backbone on the way)."""
    data = weights_bytes if isinstance(weights_bytes, bytearray) else bytearray(weights_bytes)
    return any(role == "pre_weight" for role, _ in adapter_layout(data, backbone).head)


def parse_adapter(
    config_bytes: bytes | bytearray,
    weights_bytes: bytes | bytearray,
    labels: tuple[str, ...],
    pooling: str,
    backbone: Backbone,
    activation: str | None = None,
) -> AdapterWeights:
    """Turn the two PEFT files into checked tensors; every shape is validated before use.
    LoRA factors keep the file's 16- or 32-bit float dtype (float16 for graft's own training;
    float64 is narrowed to float32), the head is float32.

    The tensors view ``weights_bytes`` when it is a bytearray (the registry's verified bytes),
    so the caller must not change it while they are in use; bytes are copied once. The
    safetensors library only copies out of memory, and a cold load copies once more into the
    packed host buffer: viewing in place saves a copy and an allocation of the file's size.
    ``activation`` (the manifest's ``head_activation``) is a two-layer head's, None otherwise.
    """
    if pooling not in POOLINGS:
        raise AdapterFormatError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    config = _parse_config(config_bytes)
    data = weights_bytes if isinstance(weights_bytes, bytearray) else bytearray(weights_bytes)
    layout = adapter_layout(data, backbone)
    factors, head_views = view_tensors(data, layout)
    modules = {
        name: LoraModule(
            a=_as_stored(a),  # AdapterMemory.pack converts once, into the pool's dtype
            b=_as_stored(b),
            scale=_scale(peft_key(backbone, name), a.shape[0], config),
        )
        for name, (a, b) in factors.items()
    }
    head = _head(head_views, pooling, labels, backbone, activation)
    rank = max((m.a.shape[0] for m in modules.values()), default=0)
    return AdapterWeights(modules=modules, head=head, labels=labels, rank=rank)


def _as_stored(factor: torch.Tensor) -> torch.Tensor:
    """16- and 32-bit factors as the file has them (a view); float64 narrowed to float32 here,
    so that a value past float32's range is an infinity that the finiteness checks see."""
    return factor if factor.element_size() <= 4 else factor.float()


# PEFT's LoRA variants (their config fields, PEFT 0.21) whose forward is not plain LoRA: at
# their defaults (None, False, an empty list) an adapter is plain LoRA, and KaSA's is any
# dict. Served as plain LoRA, an aLoRA (which PEFT's classifiers apply to no token) answered
# 0.4 off PEFT's probabilities
_LORA_VARIANTS = {
    "alora_invocation_tokens": "Activated LoRA (aLoRA)",
    "layer_replication": "Layer-replicating",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow",
    "use_bdlora": "BD-LoRA",
    "target_parameters": "Parameter-targeting (target_parameters)",
    "trainable_token_indices": "Trainable-token",
}


def _parse_config(data: bytes | bytearray) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise AdapterFormatError(f"adapter_config.json is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError("adapter_config.json must hold a JSON object")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise AdapterFormatError(f"only LoRA adapters are served, got peft_type={peft_type!r}")
    if config.get("use_dora"):
        raise AdapterFormatError("DoRA adapters are not supported (use_dora=true)")
    if config.get("lora_bias"):
        raise AdapterFormatError("LoRA bias terms are not supported (lora_bias=true)")
    for key, variant in _LORA_VARIANTS.items():
        if config.get(key) not in (None, False, []):  # an empty list selects nothing
            raise AdapterFormatError(
                f"{variant} adapters are not supported ({key}={config[key]!r}): graft serves "
                "plain LoRA, and PEFT computes these otherwise"
            )
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_INITS_REWRITING_THE_BASE):
        raise AdapterFormatError(
            f"init_lora_weights={init!r} also rewrites the base model's weights, which PEFT "
            "redoes at load but a shared backbone cannot: save the adapter converted to a "
            "plain LoRA (save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    return config


def peft_key(backbone: Backbone, module: str) -> str:
    """The name PEFT gives a backbone linear (``bert.encoder.layer.0...``): patterns match it."""
    return f"{backbone.base_prefix}.{module}" if backbone.base_prefix else module


def pattern_value(module_key: str, config: Mapping[str, Any], key: str, pattern_key: str) -> Any:
    """``config[key]``, or the value of the first ``config[pattern_key]`` entry matching
    ``module_key`` (a `peft_key`) as PEFT matches its rank and alpha patterns: the pattern, as
    a regex, ends the key at a dot boundary."""
    patterns = config.get(pattern_key) or {}
    if not isinstance(patterns, dict):
        raise AdapterFormatError(f"adapter_config.json: {pattern_key} must be an object")
    for pattern, override in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", module_key):
                return override
        except re.error as exc:
            raise AdapterFormatError(
                f"adapter_config.json: {pattern_key} key {pattern!r} is not a valid pattern: {exc}"
            ) from None
    return config.get(key)


def _scale(module: str, rank: int, config: Mapping[str, Any]) -> float:
    alpha = config_alpha(module, config)
    try:  # lenient where import was not (a registered "16" still loads)
        value = float(alpha)
    except (TypeError, ValueError):
        raise AdapterFormatError(
            f"adapter_config.json: lora_alpha for {module} must be a number, got {alpha!r}"
        ) from None
    scale = value / math.sqrt(rank) if config.get("use_rslora") else value / rank
    # one row's scale goes into the step's float32 scales: past that range it fails the whole
    # step, every tenant's rows in it
    if not math.isfinite(scale) or abs(scale) > _MAX_SCALE:
        raise AdapterFormatError(
            f"adapter_config.json: lora_alpha for {module} is {alpha!r}, a LoRA scale of "
            f"{scale:g}; a scale must be finite and at most {_MAX_SCALE:g} in size"
        )
    return scale


def config_alpha(module_key: str, config: Mapping[str, Any]) -> Any:
    """The config's LoRA alpha for one module (PEFT's default 8), as written."""
    alpha = pattern_value(module_key, config, "lora_alpha", "alpha_pattern")
    return 8 if alpha is None else alpha


def _head(
    views: Mapping[str, torch.Tensor],
    pooling: str,
    labels: tuple[str, ...],
    backbone: Backbone,
    activation: str | None,
) -> Head:
    hidden, num_labels = backbone.hidden_size, len(labels)
    weight = _checked(views["weight"], (num_labels, hidden), "classifier.weight")
    bias = _bias(views.get("bias"), num_labels, "classifier.bias")
    if pooling == POOLING_CLS_POOLER and not backbone.has_pooler:
        raise AdapterFormatError("the head pools through a [CLS] pooler the backbone lacks")
    if pooling not in backbone_poolings(backbone):
        raise AdapterFormatError(
            f"the head reads pooling {pooling!r}, which this backbone's heads never read "
            f"(it offers {', '.join(backbone_poolings(backbone))})"
        )
    if "pre_weight" not in views:
        if activation is not None:
            raise AdapterFormatError(f"head_activation={activation!r}, but the head has one layer")
        return Head(pooling=pooling, weight=weight, bias=bias)
    if activation not in HEAD_ACTIVATIONS:
        raise AdapterFormatError(
            f"the head has two layers; its activation must be one of {sorted(HEAD_ACTIVATIONS)}, "
            f"got head_activation={activation!r}"
        )
    pre_weight = _checked(views["pre_weight"], (hidden, hidden), "the head's first layer")
    pre_bias = _bias(views.get("pre_bias"), hidden, "the first layer's bias")
    return Head(pooling, weight, bias, pre_weight, pre_bias, activation)


def _bias(tensor: torch.Tensor | None, size: int, name: str) -> torch.Tensor:
    """A layer's bias, checked; zeros where the file has none (a bias=False layer)."""
    return torch.zeros(size) if tensor is None else _checked(tensor, (size,), name)


def _checked(tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise AdapterFormatError(f"{name} is {tuple(tensor.shape)}, expected {shape}")
    return tensor.float().contiguous()
