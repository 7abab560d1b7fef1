"""Segmented LoRA math over a paged adapter pool.

Kernels know nothing of tenants or requests: they take tensors and ints only.

The Triton kernels (``sgmv_lora_triton``, ``sgmv_shrink``, ``sgmv_expand``) are exported lazily:
importing ``kernels`` never imports triton, so CPU-only installs without it still work.
"""

from typing import Any

from kernels.reference import sgmv_reference
from kernels.torch_ops import bgmv_lora, sgmv_lora, sgmv_lora_lists

__all__ = ["bgmv_lora", "sgmv_lora", "sgmv_lora_lists", "sgmv_reference"]

_TRITON_EXPORTS = frozenset({"sgmv_lora_triton", "sgmv_shrink", "sgmv_expand"})


def __getattr__(name: str) -> Any:
    """Import ``kernels.triton_sgmv`` (and with it triton) on first use of one of its kernels."""
    if name in _TRITON_EXPORTS:
        from kernels import triton_sgmv

        return getattr(triton_sgmv, name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
