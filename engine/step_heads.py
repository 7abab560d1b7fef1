"""Every adapter head of a step in a few device ops, whatever the number of segments.

Applied one segment at a time, heads cost about eight device-op calls each (slice, linear,
softmax, casts); a GPU step of 40-odd tenants then spends more host time on heads than a CUDA
graph spends on the whole encoder. Here the step's heads are concatenated along the label
axis, every row is scored against all of them in one matrix product (rows x all labels: a few
thousand values), and each row keeps its own head's columns by one gather, padded labels
masked out before the softmax. Probabilities come to the host in one copy.
"""

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from engine.adapters import Head


class Pooler(Protocol):
    """A step's outputs, pooled on demand (the runner's padded, packed and static outputs)."""

    def pooled(self, pooling: str, lo: int, hi: int) -> torch.Tensor: ...


def head_probs(
    seg_starts: Sequence[int], heads: Sequence[Head | None], pooler: Pooler
) -> list[np.ndarray | None]:
    """Per segment: float32 [rows, C] probabilities of its head, or None where the segment
    has no head (backbone rows)."""
    num_rows = seg_starts[-1]
    used = [(s, h) for s, h in enumerate(heads) if h is not None]
    out: list[np.ndarray | None] = [None] * len(heads)
    if len(used) == 1:  # one head: its rows alone, nothing to gather or mask
        s, head = used[0]
        pooled = pooler.pooled(head.pooling, seg_starts[s], seg_starts[s + 1])
        logits = torch.nn.functional.linear(head.features(pooled), head.weight, head.bias)
        out[s] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        return out
    if not used:
        return out
    widths = [h.weight.shape[0] for _, h in used]
    widest = max(widths)
    # per row: the columns of its head in the concatenated label axis, -1 for padding; built
    # per segment and repeated over its rows, not written segment by segment
    seg_rows = np.diff(np.asarray(seg_starts, dtype=np.int64))
    seg_first = np.zeros(len(heads), dtype=np.int64)
    seg_width = np.zeros(len(heads), dtype=np.int64)  # 0: a segment without a head
    used_segments = [s for s, _ in used]
    seg_width[used_segments] = widths
    seg_first[used_segments] = np.cumsum(widths) - widths
    lanes = np.arange(widest)
    row_first = np.repeat(seg_first, seg_rows)[:, None]
    columns = np.where(lanes < np.repeat(seg_width, seg_rows)[:, None], row_first + lanes, -1)
    poolings = sorted({h.pooling for _, h in used})
    row_pooling = None
    if len(poolings) > 1:  # which pooling each row's head reads
        seg_pooling = np.array([h.pooling if h is not None else "" for h in heads], dtype=object)
        row_pooling = np.repeat(seg_pooling, seg_rows)
    pooled = _pooled(pooler, poolings, row_pooling, num_rows)
    two_layer = [(s, h) for s, h in used if h.pre_weight is not None]
    if two_layer:  # their first layers, segment by segment, on a copy of the pooled rows
        pooled = pooled.clone()
        for s, head in two_layer:
            lo, hi = seg_starts[s], seg_starts[s + 1]
            pooled[lo:hi] = head.features(pooled[lo:hi])
    weight = torch.cat([h.weight for _, h in used])
    bias = torch.cat([h.bias for _, h in used])
    logits = torch.nn.functional.linear(pooled, weight, bias)  # [rows, all labels]
    index = torch.from_numpy(columns).to(logits.device)
    picked = logits.gather(1, index.clamp(min=0)).float()
    picked.masked_fill_(index < 0, float("-inf"))
    probs = torch.softmax(picked, dim=-1).cpu().numpy()  # one copy to the host
    for (s, _), width in zip(used, widths, strict=True):
        out[s] = probs[seg_starts[s] : seg_starts[s + 1], :width]
    return out


def _pooled(
    pooler: Pooler, poolings: Sequence[str], row_pooling: np.ndarray | None, rows: int
) -> torch.Tensor:
    """Every row pooled as its head reads it (rows without a head: any pooling, unused);
    ``row_pooling``, each row's pooling, is needed only for several poolings."""
    pooled = pooler.pooled(poolings[0], 0, rows)
    for pooling in poolings[1:]:
        assert row_pooling is not None
        choose = torch.from_numpy(row_pooling == pooling).to(pooled.device)
        pooled = torch.where(choose[:, None], pooler.pooled(pooling, 0, rows), pooled)
    return pooled
