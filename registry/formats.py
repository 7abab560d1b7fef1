"""What files an adapter version may hold, and the checks on their formats.

Weights are accepted only as safetensors, whose header is checked by reading the 8-byte length and
the JSON that follows: nothing is deserialised beyond that JSON, no tensor is loaded, and formats
that can carry pickles (``*.bin``, ``*.pt``...) are refused by name before any byte is read.
"""

import json
import math
import re
import struct
from collections.abc import Collection
from pathlib import Path
from typing import TypeGuard

from registry.errors import InvalidAdapter
from registry.manifest import MANIFEST_FILE

WEIGHTS_FILE = "adapter_model.safetensors"
REQUIRED_FILES = ("adapter_config.json", WEIGHTS_FILE)
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
# Plain names only: no separators, no leading dot, nothing that would break the
# "name\tsha256\n" lines of the content hash.
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
# The limit the safetensors library itself puts on headers.
MAX_HEADER_BYTES = 100_000_000
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_Bytes = bytes | bytearray | memoryview
_LORA_FACTOR = re.compile(r".+\.lora_([AB])(?:\.[^.]+)?\.weight")


def is_plain_file_name(name: object) -> bool:
    """True if `name` may name a file of a version: letters, digits, ``_ . + -``, no leading dot."""
    return isinstance(name, str) and _FILE_NAME.fullmatch(name) is not None


def check_file_names(names: Collection[str]) -> None:
    """Refuse a file list with bad names, pickle formats, the manifest or required files missing."""
    for name in sorted(names):
        if not is_plain_file_name(name):
            raise InvalidAdapter(f"file name {name!r} is not allowed: use letters, digits, _ . + -")
        if name == MANIFEST_FILE:
            raise InvalidAdapter(f"{MANIFEST_FILE} is written by the registry, not the publisher")
        if Path(name).suffix.lower() in PICKLE_SUFFIXES:
            raise InvalidAdapter(f"{name}: pickle-based formats are refused, use safetensors")
    for name in REQUIRED_FILES:
        if name not in names:
            raise InvalidAdapter(f"adapter directory is missing required file {name}")


def check_adapter_config(path: Path) -> None:
    """Refuse an ``adapter_config.json`` that is not a JSON object (PEFT reads it as one)."""
    try:
        config = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise InvalidAdapter(f"{path.name} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{path.name} must hold a JSON object")


def check_safetensors(path: Path) -> dict:
    """Refuse a file that is not safetensors, judging by its header alone; return the header.

    Checks: the 8-byte little-endian header length fits the file, the header is a JSON object,
    and every tensor entry has a dtype, a shape and data offsets inside the data section whose
    length matches shape and dtype (for the dtypes listed above; newer dtypes pass on offsets).
    """
    file_bytes = path.stat().st_size
    with path.open("rb") as file:
        prefix = file.read(8)
        header_bytes = _header_length(path.name, prefix, file_bytes)
        header_text = file.read(header_bytes)
    return _checked_header(path.name, header_text, file_bytes - 8 - header_bytes)


def lora_rank(header: dict) -> int:
    """The highest rank of the LoRA factors in a checked safetensors header, 0 for none (a
    head-only version). Factors are PEFT's ``*.lora_A[.<adapter>].weight`` (rank first) and
    ``lora_B`` (rank last)."""
    ranks = [0]
    for tensor_name, entry in header.items():
        match = _LORA_FACTOR.fullmatch(tensor_name)
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if match is not None and isinstance(shape, list) and len(shape) == 2:
            ranks.append(shape[0] if match.group(1) == "A" else shape[1])
    return max(ranks)


def check_lora_rank(found: int, rank: int) -> None:
    """Refuse weights whose LoRA factors (rank `found`) exceed the manifest's `rank`: servers
    budget an adapter's pool pages from the manifest, and refuse such a version at every load."""
    if found > rank:
        raise InvalidAdapter(
            f"manifest['rank'] is {rank}, but {WEIGHTS_FILE} holds rank-{found} LoRA factors"
        )


def safetensors_header(name: str, data: _Bytes) -> tuple[dict[str, dict], int]:
    """The tensor entries of a whole safetensors file held in memory, with the same checks as
    `check_safetensors`, and where its data section starts: readers that already hold the
    verified bytes view tensors in place instead of copying them out."""
    view = memoryview(data)
    header_bytes = _header_length(name, view[:8], len(view))
    header = _checked_header(name, view[8 : 8 + header_bytes], len(view) - 8 - header_bytes)
    header.pop("__metadata__", None)
    return header, 8 + header_bytes


def _header_length(name: str, prefix: _Bytes, file_bytes: int) -> int:
    if len(prefix) < 8:
        raise InvalidAdapter(f"{name} is not a safetensors file: shorter than 8 bytes")
    (header_bytes,) = struct.unpack("<Q", prefix)
    if not 2 <= header_bytes <= min(MAX_HEADER_BYTES, file_bytes - 8):
        raise InvalidAdapter(f"{name} is not a safetensors file: bad header length")
    return header_bytes


def _checked_header(name: str, header_text: _Bytes, data_bytes: int) -> dict:
    try:
        header = json.loads(bytes(header_text).decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise InvalidAdapter(f"{name} is not a safetensors file: header is not JSON") from None
    if not isinstance(header, dict):
        raise InvalidAdapter(f"{name} is not a safetensors file: header is not an object")
    for tensor_name, entry in header.items():
        if tensor_name != "__metadata__":
            _check_tensor_entry(name, tensor_name, entry, data_bytes)
    return header


def _check_tensor_entry(file_name: str, tensor_name: str, entry: object, data_bytes: int) -> None:
    problem = f"{file_name}: tensor {tensor_name!r} has a malformed header entry"
    if not isinstance(entry, dict):
        raise InvalidAdapter(problem)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or not _is_int_list(shape) or not _is_int_list(offsets):
        raise InvalidAdapter(problem)
    if len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1] <= data_bytes:
        raise InvalidAdapter(f"{file_name}: tensor {tensor_name!r} lies outside the data section")
    if any(size < 0 for size in shape):
        raise InvalidAdapter(problem)
    itemsize = _DTYPE_BYTES.get(dtype)
    if itemsize is not None and offsets[1] - offsets[0] != itemsize * math.prod(shape):
        raise InvalidAdapter(f"{file_name}: tensor {tensor_name!r} size disagrees with its shape")


def _is_int_list(value: object) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    )
