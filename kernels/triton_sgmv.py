"""Segmented LoRA in Triton: a shrink kernel (x @ A_s.T) and an expand kernel (v @ B_s into y).

Both kernels run one program per (segment, token tile), from a tile map built on the device, so
no host sync is needed to size the grid. Pages are read through the per-segment page table, so an
adapter's rank-rows may sit anywhere in the pool. On CPU-only machines Triton's interpreter runs
the same code (``TRITON_INTERPRET=1`` set before triton is imported).
"""

import torch
import triton
import triton.language as tl

_MIN_DOT = 16  # tl.dot needs every block dimension >= 16


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    v_ptr,
    tile_seg_ptr,
    tile_row_ptr,
    seg_starts_ptr,
    seg_pages_ptr,
    seg_rank_ptr,
    num_segments,
    in_features,
    stride_xm,
    stride_xk,
    stride_ap,
    stride_ak,
    stride_vm,
    stride_ps,
    stride_pr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IS_INTERPRETED: tl.constexpr,
):
    tile = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + tile)
    if seg >= num_segments:  # past the last tile: the grid is an upper bound
        return
    rank = tl.load(seg_rank_ptr + seg)
    if rank == 0:  # this module has no LoRA for this segment's adapter
        return
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(seg_starts_ptr + seg + 1)
    rows = rows.to(tl.int64)
    r = tl.arange(0, R_PAD)
    r_mask = r < rank
    pages = tl.load(seg_pages_ptr + seg * stride_ps + r * stride_pr, mask=r_mask, other=0)
    pages = pages.to(tl.int64)
    acc = shrink_tile(
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
    tl.store(v_ptr + rows[:, None] * stride_vm + r[None, :], acc, mask=row_mask[:, None])


@triton.jit
def shrink_tile(
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
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IS_INTERPRETED: tl.constexpr,
):
    """``x[rows] @ A.T`` for one token tile, A's rows at ``pages``: [BLOCK_M, R_PAD] float32,
    zero past the rank (shared by the shrink kernel and the fused one)."""
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < in_features
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        a = tl.load(
            a_ptr + pages[:, None] * stride_ap + k[None, :] * stride_ak,
            mask=r_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if IS_INTERPRETED:  # the interpreter's bf16 dot is broken: multiply in fp32 there
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        # "ieee" keeps fp32 inputs out of tf32; it is ignored for fp16/bf16 inputs
        acc = tl.dot(x, tl.trans(a), acc, input_precision="ieee")
    return acc


@triton.jit
def _expand_kernel(
    y_ptr,
    v_ptr,
    b_ptr,
    tile_seg_ptr,
    tile_row_ptr,
    seg_starts_ptr,
    seg_pages_ptr,
    seg_rank_ptr,
    seg_scale_ptr,
    num_segments,
    out_features,
    stride_ym,
    stride_yn,
    stride_vm,
    stride_bp,
    stride_bn,
    stride_ps,
    stride_pr,
    R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_INTERPRETED: tl.constexpr,
):
    tile = tl.program_id(0)
    seg = tl.load(tile_seg_ptr + tile)
    if seg >= num_segments:
        return
    rank = tl.load(seg_rank_ptr + seg)
    if rank == 0:
        return
    scale = tl.load(seg_scale_ptr + seg)
    rows = tl.load(tile_row_ptr + tile) + tl.arange(0, BLOCK_M)
    row_mask = rows < tl.load(seg_starts_ptr + seg + 1)
    rows = rows.to(tl.int64)
    r = tl.arange(0, R_PAD)
    r_mask = r < rank
    pages = tl.load(seg_pages_ptr + seg * stride_ps + r * stride_pr, mask=r_mask, other=0)
    pages = pages.to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < out_features
    v = tl.load(
        v_ptr + rows[:, None] * stride_vm + r[None, :],
        mask=row_mask[:, None] & r_mask[None, :],
        other=0.0,
    )
    b = tl.load(
        b_ptr + pages[:, None] * stride_bp + n[None, :] * stride_bn,
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    )
    # v stays float32: rounding it to a 16-bit pool dtype first costs more accuracy than the
    # (rank-deep, memory-bound) product gains from tensor cores
    b = b.to(tl.float32)
    delta = tl.dot(v, b, input_precision="ieee")
    y_ptrs = y_ptr + rows[:, None] * stride_ym + n[None, :] * stride_yn
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scale * delta).to(y_ptr.dtype.element_ty), mask=y_mask)


# What triton decided when it decorated the kernels, read once: the interpreter wraps them.
IS_INTERPRETED = not isinstance(_shrink_kernel, triton.runtime.JITFunction)
# The interpreter pays per program and per op, not per element: wide tiles finish sooner there.
_BLOCK_M = 32
_BLOCK_K = 256 if IS_INTERPRETED else 64
_BLOCK_N = 512 if IS_INTERPRETED else 64


def padded_rank(max_rank: int) -> int:
    """Columns of the shrink output for ranks up to ``max_rank``: a power of two, at least 16."""
    if max_rank < 0:
        raise ValueError(f"max_rank must be >= 0, got {max_rank}")
    return max(_MIN_DOT, triton.next_power_of_2(max_rank))


def tile_map(seg_starts: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per program: its segment (``S`` past the last tile) and its first token, both int32.

    Depends on the token offsets alone, so one map serves every module of a step (the kernels
    return at once for a segment whose rank is 0 in that module); the engine builds it once per
    step and token count. Empty segments get no tiles. The map's length bounds the real tile
    count from above (each tile holds at least one token; each segment wastes < one tile), so
    the grid is sized without reading anything back from the device.
    """
    num_segments = seg_starts.shape[0] - 1
    if num_segments <= 0 or num_tokens == 0:
        empty = torch.empty(0, dtype=torch.int32, device=seg_starts.device)
        return empty, empty
    lengths = (seg_starts[1:] - seg_starts[:-1]).long()
    num_tiles = (lengths + _BLOCK_M - 1) // _BLOCK_M
    ends = torch.cumsum(num_tiles, 0)
    bound = min(num_tokens, triton.cdiv(num_tokens, _BLOCK_M) + num_segments)
    tiles = torch.arange(bound, device=seg_starts.device, dtype=ends.dtype)
    tile_seg = torch.searchsorted(ends, tiles, right=True)
    seg = tile_seg.clamp(max=num_segments - 1)
    tile_row = seg_starts[seg].long() + (tiles - (ends - num_tiles)[seg]) * _BLOCK_M
    return tile_seg.int(), tile_row.int()


def _check_pair(rows: torch.Tensor, pool: torch.Tensor, name: str) -> None:
    """``rows`` [N, W] and its ``pool`` [P, W] must agree in width, dtype and device."""
    if rows.dim() != 2 or pool.dim() != 2 or rows.shape[1] != pool.shape[1]:
        raise ValueError(f"{name} {tuple(rows.shape)} and its pool {tuple(pool.shape)} differ")
    if rows.dtype != pool.dtype or rows.device != pool.device:
        raise ValueError(
            f"{name} is {rows.dtype} on {rows.device}, its pool {pool.dtype} on {pool.device}"
        )


def _shrink(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_pages: torch.Tensor,
    seg_rank: torch.Tensor,
    v: torch.Tensor,
    tile_seg: torch.Tensor,
    tile_row: torch.Tensor,
) -> None:
    """Launch the shrink over a prebuilt tile map, writing ``v`` rows of the mapped tiles."""
    _shrink_kernel[(tile_seg.shape[0],)](
        x,
        a_pool,
        v,
        tile_seg,
        tile_row,
        seg_starts,
        seg_pages,
        seg_rank,
        seg_rank.shape[0],
        x.shape[1],
        x.stride(0),
        x.stride(1),
        a_pool.stride(0),
        a_pool.stride(1),
        v.stride(0),
        seg_pages.stride(0),
        seg_pages.stride(1),
        R_PAD=v.shape[1],
        BLOCK_M=_BLOCK_M,
        BLOCK_K=_BLOCK_K,
        IS_INTERPRETED=IS_INTERPRETED,
    )


def _expand(
    y: torch.Tensor,
    v: torch.Tensor,
    b_pool: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_pages: torch.Tensor,
    seg_rank: torch.Tensor,
    seg_scale: torch.Tensor,
    tile_seg: torch.Tensor,
    tile_row: torch.Tensor,
) -> None:
    """Launch the expand over a prebuilt tile map: one program per (tile, ``out`` block)."""
    grid = (tile_seg.shape[0], triton.cdiv(y.shape[1], _BLOCK_N))
    _expand_kernel[grid](
        y,
        v,
        b_pool,
        tile_seg,
        tile_row,
        seg_starts,
        seg_pages,
        seg_rank,
        seg_scale,
        seg_rank.shape[0],
        y.shape[1],
        y.stride(0),
        y.stride(1),
        v.stride(0),
        b_pool.stride(0),
        b_pool.stride(1),
        seg_pages.stride(0),
        seg_pages.stride(1),
        R_PAD=v.shape[1],
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        IS_INTERPRETED=IS_INTERPRETED,
    )


def sgmv_shrink(
    x: torch.Tensor,
    a_pool: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_pages: torch.Tensor,
    seg_rank: torch.Tensor,
    max_rank: int,
) -> torch.Tensor:
    """Return ``v`` with ``v[seg, :r_s] = x[seg] @ A_s.T`` for every segment, in float32.

    - ``x``: [N, in], fp32 / fp16 / bf16, any strides; rows sorted so segments are contiguous.
    - ``a_pool``: [P, in], x's dtype; row ``p`` is one rank-row of some adapter's A.
    - ``seg_starts``: int32 [S + 1], token offsets; ``seg_pages``: int32 [S, R], pool rows of
      each segment's adapter (any order, need not be contiguous); ``seg_rank``: int32 [S].
    - ``max_rank``: an upper bound of ``seg_rank`` (not checked: that would sync the device).

    ``v`` is a new float32 [N, R_pad] tensor, contiguous, ``R_pad = padded_rank(max_rank)``.
    Columns at or past a segment's rank are zero, and so are the rows of segments with rank 0.
    Products accumulate in float32.
    """
    _check_pair(x, a_pool, "x")
    v = torch.zeros((x.shape[0], padded_rank(max_rank)), dtype=torch.float32, device=x.device)
    tile_seg, tile_row = tile_map(seg_starts, x.shape[0])
    if tile_seg.numel():
        _shrink(x, a_pool, seg_starts, seg_pages, seg_rank, v, tile_seg, tile_row)
    return v


def sgmv_expand(
    y: torch.Tensor,
    v: torch.Tensor,
    b_pool: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_pages: torch.Tensor,
    seg_rank: torch.Tensor,
    seg_scale: torch.Tensor,
) -> None:
    """Add ``scale_s * v[seg, :r_s] @ B_s`` into ``y`` in place for every segment.

    - ``y``: [N, out], fp32 / fp16 / bf16, any strides; rows of rank-0 segments stay untouched.
    - ``v``: float32 [N, R_pad], row stride free, columns contiguous (as :func:`sgmv_shrink`
      returns it); every ``seg_rank`` must be <= R_pad.
    - ``b_pool``: [P, out], y's dtype; row ``p`` is the matching row of B transposed.
    - ``seg_starts``, ``seg_pages``, ``seg_rank``: as for :func:`sgmv_shrink`;
      ``seg_scale``: float32 [S].

    Accumulates in float32 (``v`` is never rounded to the pool dtype) and rounds once into y's
    dtype.
    """
    _check_pair(y, b_pool, "y")
    if v.dtype != torch.float32 or v.shape[0] != y.shape[0] or v.stride(1) != 1:
        raise ValueError("v must be float32 [N, R_pad] with contiguous columns, N as in y")
    tile_seg, tile_row = tile_map(seg_starts, y.shape[0])
    if tile_seg.numel():
        _expand(y, v, b_pool, seg_starts, seg_pages, seg_rank, seg_scale, tile_seg, tile_row)


def sgmv_lora_triton(
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
    """:func:`kernels.sgmv_lora` in two Triton launches: shrink into float32, then expand.

    Same shapes and layout as :func:`kernels.sgmv_lora`; ``x``, the pools and ``y`` share one
    dtype (fp32, fp16 or bf16) and device. ``R`` (``seg_pages.shape[1]``) bounds the ranks, so
    nothing is read back from the device. Products accumulate in float32. ``tiles``: the
    :func:`tile_map` of ``seg_starts``, when the caller keeps one for many calls (a dozen small
    device ops fewer per call: on a GPU these calls are bound by launches, not by bytes).
    """
    _check_pair(x, a_pool, "x")
    _check_pair(y, b_pool, "y")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
    tile_seg, tile_row = tiles if tiles is not None else tile_map(seg_starts, x.shape[0])
    if not tile_seg.numel():
        return
    # no zero fill: expand reads only the rows and rank columns that shrink wrote
    r_pad = padded_rank(seg_pages.shape[1])
    v = torch.empty((x.shape[0], r_pad), dtype=torch.float32, device=x.device)
    _shrink(x, a_pool, seg_starts, seg_pages, seg_rank, v, tile_seg, tile_row)
    _expand(y, v, b_pool, seg_starts, seg_pages, seg_rank, seg_scale, tile_seg, tile_row)
