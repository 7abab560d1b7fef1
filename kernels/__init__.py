"""Segmented LoRA math over a paged adapter pool.

Kernels know nothing of tenants or requests: they take tensors and ints only.
"""

from kernels.reference import sgmv_reference
from kernels.torch_ops import bgmv_lora, sgmv_lora

__all__ = ["bgmv_lora", "sgmv_lora", "sgmv_reference"]
