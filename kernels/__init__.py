"""Segmented LoRA math over a paged adapter pool.

Kernels know nothing of tenants or requests: they take tensors and ints only.

The Triton kernels (``sgmv_lora_triton``, ``sgmv_shrink``, ``sgmv_expand``, and the one-launch
``sgmv_lora_triton_fused``) are exported lazily: importing ``kernels`` never imports triton, so
CPU-only installs without it still work.
"""

from typing import Any

from kernels.reference import sgmv_reference
from kernels.torch_ops import PoolViews, bgmv_lora, sgmv_lora, sgmv_lora_lists, sgmv_lora_views

__all__ = [
    "PoolViews",
    "bgmv_lora",
    "sgmv_lora",
    "sgmv_lora_lists",
    "sgmv_lora_views",
    "sgmv_reference",
]

_TRITON_EXPORTS = {
    "sgmv_lora_triton": "triton_sgmv",
    "sgmv_shrink": "triton_sgmv",
    "sgmv_expand": "triton_sgmv",
    "sgmv_lora_triton_fused": "triton_fused",
}


def __getattr__(name: str) -> Any:
    """Import the Triton kernels' module (and with it triton) on first use of one of them."""
    if name in _TRITON_EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"kernels.{_TRITON_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
