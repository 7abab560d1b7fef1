"""Segmented LoRA in one Triton launch per Linear: shrink and expand fused.

Each program takes one (segment, token tile) and one block of ``out`` columns, computes the
tile's shrink ``x @ A_s.T`` (rank-deep, float32) itself and adds ``scale_s * shrink @ B_s`` into
its columns of ``y``. The shrink is recomputed once per column block, which costs little next
to the launch it saves: on a GPU a step of small batches is bound by launches (two per wrapped
Linear in ``kernels.triton_sgmv``, about 69 us of Python each on an H200, benchmarks/RESULTS.md),
and this path also allocates no intermediate buffer. Same inputs, tile map and accuracy
(float32 accumulation) as :func:`kernels.triton_sgmv.sgmv_lora_triton`.
"""

import torch
import triton
import triton.language as tl

from kernels.triton_sgmv import (
    _BLOCK_M,
    IS_INTERPRETED,
    _check_pair,
    padded_rank,
    shrink_tile,
    tile_map,
)

_BLOCK_K = 256 if IS_INTERPRETED else 64
# wider column blocks than the expand's: each block pays the tile's shrink again
_BLOCK_N = 512 if IS_INTERPRETED else 128


@triton.jit
def _fused_kernel(
    y_ptr,
    x_ptr,
    a_ptr,
    b_ptr,
    tile_seg_ptr,
    tile_row_ptr,
    seg_starts_ptr,
    seg_pages_ptr,
    seg_rank_ptr,
    seg_scale_ptr,
    num_segments,
    in_features,
    out_features,
    stride_ym,
    stride_yn,
    stride_xm,
    stride_xk,
    stride_ap,
    stride_ak,
    stride_bp,
    stride_bn,
    stride_ps,
    stride_pr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_INTERPRETED: tl.constexpr,
):
    tile = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + tile)
    if seg >= num_segments:  # past the last tile: the grid is an upper bound
        return
    rank = tl.load(seg_rank_ptr + seg)
    if rank == 0:  # this module has no LoRA for this segment's adapter
        return
    scale = tl.load(seg_scale_ptr + seg)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(seg_starts_ptr + seg + 1)
    rows = rows.to(tl.int64)
    r = tl.arange(0, R_PAD)
    r_mask = r < rank
    pages = tl.load(seg_pages_ptr + seg * stride_ps + r * stride_pr, mask=r_mask, other=0)
    pages = pages.to(tl.int64)
    shrunk = shrink_tile(
        x_ptr,
        a_ptr,
        rows,
        row_mask,
        pages,
        r_mask,
        in_features,
        stride_xm,
        stride_xk,
        stride_ap,
        stride_ak,
        R_PAD,
        BLOCK_M,
        BLOCK_K,
        IS_INTERPRETED,
    )
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < out_features
    b = tl.load(
        b_ptr + pages[:, None] * stride_bp + n[None, :] * stride_bn,
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    )
    # the shrink stays float32, as in the two-launch expand
    delta = tl.dot(shrunk, b.to(tl.float32), input_precision="ieee")
    y_ptrs = y_ptr + rows[:, None] * stride_ym + n[None, :] * stride_yn
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scale * delta).to(y_ptr.dtype.element_ty), mask=y_mask)


def sgmv_lora_triton_fused(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_pages: torch.Tensor,
    seg_rank: torch.Tensor,
    seg_scale: torch.Tensor,
    tiles: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """:func:`kernels.sgmv_lora` in one Triton launch; arguments as for
    :func:`kernels.triton_sgmv.sgmv_lora_triton`. ``y`` must not share memory with ``x``."""
    _check_pair(x, a_pool, "x")
    _check_pair(y, b_pool, "y")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    tile_seg, tile_row = tiles if tiles is not None else tile_map(seg_starts, x.shape[0])
    if not tile_seg.numel():
        return
    grid = (tile_seg.shape[0], triton.cdiv(y.shape[1], _BLOCK_N))
    _fused_kernel[grid](
        y,
        x,
        a_pool,
        b_pool,
        tile_seg,
        tile_row,
        seg_starts,
        seg_pages,
        seg_rank,
        seg_scale,
        seg_rank.shape[0],
        x.shape[1],
        y.shape[1],
        y.stride(0),
        y.stride(1),
        x.stride(0),
        x.stride(1),
        a_pool.stride(0),
        a_pool.stride(1),
        b_pool.stride(0),
        b_pool.stride(1),
        seg_pages.stride(0),
        seg_pages.stride(1),
        R_PAD=padded_rank(seg_pages.shape[1]),
        BLOCK_M=_BLOCK_M,
        BLOCK_K=_BLOCK_K,
        BLOCK_N=_BLOCK_N,
        IS_INTERPRETED=IS_INTERPRETED,
    )
