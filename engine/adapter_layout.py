"""Where each tensor of an ``adapter_model.safetensors`` sits, checked against the backbone.

Every adapter trained on one backbone with one recipe has the same safetensors header: the
same keys, shapes and offsets. Checking that header (JSON, key roles, every shape against the
backbone's Linears) took most of a cold load's parse, so its result is kept per backbone, keyed
by the exact header bytes; a file whose header was seen before is only viewed, not re-checked.
"""

import functools
import math
import re
import struct
import sys
from dataclasses import dataclass

import numpy as np
import torch

from engine.backbone import Backbone
from engine.errors import AdapterFormatError
from registry import InvalidAdapter, safetensors_header

WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# the head's last (or only) layer: BERT's classifier, a decoder's score, or the out_proj of
# RoBERTa's and ELECTRA's two-layer heads; and the first layer of two-layer heads (DistilBERT's
# pre_classifier, RoBERTa's and ELECTRA's classifier.dense, DeBERTa's pooler.dense, outside
# its base model), which PEFT saves beside the LoRA
_HEAD_NAMES = ("classifier", "score", "classifier.out_proj")
_PRE_HEAD_NAMES = ("pre_classifier", "classifier.dense", "pooler.dense")
_LORA_KEY = re.compile(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
# the float types LoRA factors and heads are stored in; anything else is refused
_FLOAT_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}
# numpy's twins of those types (bfloat16 has none: viewed as 16-bit words, then by torch)
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}
_MAX_LAYOUTS = 256  # distinct headers remembered per backbone (one per recipe, in practice)


@dataclass(frozen=True, slots=True)
class TensorAt:
    """One tensor of the file: its type, shape and byte offset from the file's start."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    strides: tuple[int, ...]  # of the contiguous tensor, in elements

    def view(self, data: bytearray) -> torch.Tensor:
        """This tensor as a view of ``data`` (the file), copied only if misaligned.

        Made by numpy: each torch view op gives up the interpreter lock, and a loader thread
        beside a busy event loop waits up to a switch interval to take it back (74 views for
        an adapter on every encoder Linear). numpy's views and ``torch.from_numpy`` keep it."""
        count = math.prod(self.shape)
        if count == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        words = _NUMPY_DTYPES.get(self.dtype, np.uint16)  # bfloat16: its 16-bit words
        array = np.frombuffer(data, dtype=words, count=count, offset=self.offset)
        if self.offset % self.dtype.itemsize:
            array = array.copy()  # aligned, as torch's kernels expect
        tensor = torch.from_numpy(array.reshape(self.shape))
        return tensor if self.dtype in _NUMPY_DTYPES else tensor.view(self.dtype)


@dataclass(frozen=True, slots=True)
class AdapterLayout:
    """A checked header: LoRA factors by backbone module, and the head's tensors."""

    modules: tuple[tuple[str, TensorAt, TensorAt], ...]  # (module, lora_A, lora_B)
    head: tuple[tuple[str, TensorAt], ...]  # weight, bias, pre_weight, pre_bias: those present
    file_bytes: int  # the file must be at least this long for every offset to lie inside


def adapter_layout(data: bytearray, backbone: Backbone) -> AdapterLayout:
    """The layout of ``data`` (a whole safetensors file), from the backbone's cache or checked
    now. Raises AdapterFormatError naming the first problem."""
    cache: dict[bytes, AdapterLayout] = backbone.adapter_layouts
    key = _header_key(data)
    layout = cache.get(key) if key is not None else None
    if layout is None:
        layout = _check(data, backbone)
        if len(cache) >= _MAX_LAYOUTS:
            cache.clear()
        if key is not None:
            cache[key] = layout
    if len(data) < layout.file_bytes:
        raise AdapterFormatError(f"{WEIGHTS_FILE} is truncated: a tensor lies past its end")
    return layout


def view_tensors(
    data: bytearray, layout: AdapterLayout
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """(module -> (A, B), the head's tensors by role) as views of ``data``, no copies."""
    modules = {name: (a.view(data), b.view(data)) for name, a, b in layout.modules}
    return modules, {role: tensor.view(data) for role, tensor in layout.head}


def _header_key(data: bytearray) -> bytes | None:
    if len(data) < 8:
        return None
    (length,) = struct.unpack_from("<Q", data)
    if length > len(data) - 8:
        return None
    return bytes(memoryview(data)[8 : 8 + length])


def _check(data: bytearray, backbone: Backbone) -> AdapterLayout:
    """Every check that depends only on the header and the backbone."""
    try:
        header, start = safetensors_header(WEIGHTS_FILE, data)
    except InvalidAdapter as exc:
        raise AdapterFormatError(str(exc)) from exc
    if sys.byteorder != "little":  # safetensors is little-endian; views need native order
        raise AdapterFormatError("adapter weights are read on little-endian machines only")
    lora: dict[str, dict[str, TensorAt]] = {}
    lora_keys: dict[tuple[str, str], str] = {}  # (module, factor) -> the key that held it
    head: dict[str, TensorAt] = {}
    file_bytes = start
    for key, entry in header.items():
        dtype = _FLOAT_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise AdapterFormatError(
                f"tensor {key!r} is {entry['dtype']}; adapters are stored as "
                f"{', '.join(_FLOAT_DTYPES)}"
            )
        begin, end = entry["data_offsets"]
        file_bytes = max(file_bytes, start + end)
        shape = tuple(entry["shape"])
        tensor = TensorAt(dtype, shape, start + begin, _contiguous_strides(shape))
        kind, module, part = _key_role(key, backbone.base_prefix)
        if kind == "lora":
            # "bert.encoder..." and "encoder...", or a second adapter name, name one factor:
            # whichever came last would be served where PEFT loads another
            if (seen := lora_keys.setdefault((module, part), key)) != key:
                raise AdapterFormatError(f"two lora_{part} tensors for {module}: {seen!r}, {key!r}")
            lora.setdefault(module, {})[part] = tensor
        elif kind == "head":
            if part in head:
                raise AdapterFormatError(f"two classifier heads: {key!r} and another {part}")
            head[part] = tensor
        else:
            raise AdapterFormatError(f"unexpected tensor {key!r}: only LoRA factors and the head")
    modules = tuple(_check_module(name, pair, backbone) for name, pair in lora.items())
    if "weight" not in head:
        raise AdapterFormatError("no classifier head (classifier.weight) in the adapter")
    if "pre_bias" in head and "pre_weight" not in head:
        raise AdapterFormatError("the head's first layer has a bias but no weight")
    return AdapterLayout(modules=modules, head=tuple(head.items()), file_bytes=file_bytes)


def _check_module(
    name: str, pair: dict[str, TensorAt], backbone: Backbone
) -> tuple[str, TensorAt, TensorAt]:
    wrapper = backbone.linears.get(name)
    if wrapper is None:
        raise AdapterFormatError(f"LoRA targets {name!r}, which is not a Linear of the backbone")
    if set(pair) != {"A", "B"}:
        raise AdapterFormatError(f"{name}: needs both lora_A and lora_B")
    a, b = pair["A"], pair["B"]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != wrapper.in_features:
        raise AdapterFormatError(
            f"{name}: lora_A is {a.shape}, expected (r, {wrapper.in_features})"
        )
    rank = a.shape[0]
    if b.shape != (wrapper.out_features, rank):
        raise AdapterFormatError(
            f"{name}: lora_B is {b.shape}, expected ({wrapper.out_features}, {rank})"
        )
    if not 1 <= rank <= 256:
        raise AdapterFormatError(f"{name}: rank {rank} outside 1..256")
    return name, a, b


@functools.lru_cache(maxsize=8192)
def _key_role(key: str, base_prefix: str) -> tuple[str, str, str]:
    """("lora", module, "A" or "B"), ("head", "", "weight", "bias", "pre_weight" or
    "pre_bias"), or ("other", "", "")."""
    name = key.removeprefix(_PEFT_PREFIX)
    match = _LORA_KEY.fullmatch(name)
    if match:
        module = match.group(1)
        if base_prefix and module.startswith(base_prefix + "."):
            module = module[len(base_prefix) + 1 :]
        return "lora", module, match.group(2)
    head_name = name.replace(".modules_to_save", "").replace(".default", "")
    owner, _, param = head_name.rpartition(".")
    if owner in _HEAD_NAMES and param in ("weight", "bias"):
        return "head", "", param
    if owner in _PRE_HEAD_NAMES and param in ("weight", "bias"):
        return "head", "", "pre_" + param
    return "other", "", ""


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
