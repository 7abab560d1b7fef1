"""Head-only models applied on the host to pooled backbone outputs.

Head-only models of one request share a bare-backbone row per input (or a cached pooled
output), so their heads run after the step: the heads reading the same pooling are stacked
and applied with one matrix product per step, whatever their number.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from engine.adapters import Head


@dataclass(frozen=True, slots=True)
class HeadGroup:
    """The head-only models of a request that read one pooling, stacked."""

    pooling: str  # one of engine.adapters.POOLINGS
    slots: tuple[int, ...]  # each model's position in the request's model list
    bounds: tuple[int, ...]  # len(slots) + 1 offsets of each model's labels in the stacked axis
    weight: np.ndarray  # float32 [sum of label counts, H]
    bias: np.ndarray  # float32 [sum of label counts]
    # a two-layer head (alone in its group): its first layer runs before ``weight``
    first_layer: Head | None = None

    def probs(self, pooled: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(slot, float32 [N, C] label probabilities) per model, from pooled float32 [N, H]."""
        pooled = pooled.astype(np.float32, copy=False)
        if self.first_layer is not None:
            pooled = self.first_layer.features(torch.from_numpy(pooled)).numpy()
        logits = pooled @ self.weight.T + self.bias
        out = []
        for k, slot in enumerate(self.slots):
            part = logits[:, self.bounds[k] : self.bounds[k + 1]]
            exp = np.exp(part - part.max(axis=1, keepdims=True))
            out.append((slot, exp / exp.sum(axis=1, keepdims=True)))
        return out


def group_heads(heads: Mapping[int, Head]) -> tuple[HeadGroup, ...]:
    """Stack the heads (by slot) of head-only models into one group per pooling; a two-layer
    head makes a group of its own."""
    by_pooling: dict[str, list[tuple[int, Head]]] = {}
    groups = []
    for slot, head in sorted(heads.items()):
        if head.pre_weight is None:
            by_pooling.setdefault(head.pooling, []).append((slot, head))
            continue
        groups.append(
            HeadGroup(
                pooling=head.pooling,
                slots=(slot,),
                bounds=(0, head.weight.shape[0]),
                weight=_host(head.weight),
                bias=_host(head.bias),
                first_layer=head.with_tensors([t.detach().float().cpu() for t in head.tensors()]),
            )
        )
    for pooling, members in sorted(by_pooling.items()):
        bounds = [0]
        for _, head in members:
            bounds.append(bounds[-1] + head.weight.shape[0])
        groups.append(
            HeadGroup(
                pooling=pooling,
                slots=tuple(slot for slot, _ in members),
                bounds=tuple(bounds),
                weight=np.concatenate([_host(h.weight) for _, h in members]),
                bias=np.concatenate([_host(h.bias) for _, h in members]),
            )
        )
    return tuple(groups)


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A float32 numpy view of a (possibly pinned) host-tier tensor."""
    return tensor.detach().float().cpu().numpy()
