"""Float32 reference for the segmented LoRA update: slow, obvious, the ground truth."""

import torch


def sgmv_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a_pool: torch.Tensor,
    b_pool: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_pages: torch.Tensor,
    seg_rank: torch.Tensor,
    seg_scale: torch.Tensor,
) -> torch.Tensor:
    """Return ``y + scale_s * (x_s @ A_s.T) @ B_s`` for every segment ``s``, computed in float32.

    Shapes and layout are those of :func:`kernels.sgmv_lora`; ``y`` is not modified.
    """
    out = y.float().clone()
    starts = seg_starts.tolist()
    for s, (rank, scale) in enumerate(zip(seg_rank.tolist(), seg_scale.tolist(), strict=True)):
        if rank == 0 or starts[s] == starts[s + 1]:
            continue
        rows = seg_pages[s, :rank].long()
        a = a_pool.index_select(0, rows).float()
        b = b_pool.index_select(0, rows).float()
        xs = x[starts[s] : starts[s + 1]].float()
        out[starts[s] : starts[s + 1]] += scale * (xs @ a.t()) @ b
    return out
