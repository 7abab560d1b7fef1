"""One engine step: padded token ids in, per-row label probabilities out.

Runs on the engine's single model thread; never touches asyncio.
"""

from collections.abc import Sequence

import numpy as np
import torch

from engine.adapters import POOLING_CLS_POOLER
from engine.backbone import Backbone
from engine.lora import LoraKernel, LoraStepPlan
from engine.memory import AdapterMemory, Resident
from scheduler import Batch


class ModelRunner:
    """Builds the step's LoRA plan, runs the backbone once, applies each segment's head."""

    def __init__(
        self, backbone: Backbone, memory: AdapterMemory, device: str, kernel: LoraKernel
    ) -> None:
        self._backbone = backbone
        self._kernel = kernel
        self._memory = memory
        self._device = device
        pad = backbone.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else 0
        self.num_steps = 0
        self.num_rows = 0

    @torch.inference_mode()
    def step(self, batch: Batch, token_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Probabilities for each row of ``batch`` in row order (labels as the adapter's).

        Rows leave torch as numpy float32 vectors: one array per segment, sliced per row.
        """
        residents = [self._memory.get(key) for key in batch.seg_adapter]
        input_ids, mask = self._pad(token_ids, batch.max_tokens)
        state = self._backbone.lora_state
        state.plan = self._plan(batch, residents)
        try:
            out = self._backbone.model(input_ids=input_ids, attention_mask=mask)
        finally:
            state.plan = None
        probs: list[np.ndarray] = []
        for s, resident in enumerate(residents):
            lo, hi = batch.seg_starts[s], batch.seg_starts[s + 1]
            pooled = self._pooled(out, mask, resident, lo, hi)
            head = resident.head
            logits = torch.nn.functional.linear(pooled, head.weight, head.bias)
            probs.extend(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        self.num_steps += 1
        self.num_rows += len(batch.rows)
        return probs

    def _pad(
        self, token_ids: Sequence[Sequence[int]], width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(token_ids), width), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for i, row in enumerate(token_ids):
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids.to(self._device), mask.to(self._device)

    def _plan(self, batch: Batch, residents: list[Resident]) -> LoraStepPlan:
        max_rank = max((len(r.pages) for r in residents), default=0)
        # padding points at page 0, which holds zeros in every pool
        pages = torch.zeros((len(residents), max(max_rank, 1)), dtype=torch.int32)
        for s, resident in enumerate(residents):
            if resident.pages:
                pages[s, : len(resident.pages)] = torch.tensor(resident.pages, dtype=torch.int32)
        ranks = torch.stack([r.rank_by_module for r in residents], dim=1)
        scales = torch.stack([r.scale_by_module for r in residents], dim=1)
        lengths = torch.tensor(
            [batch.seg_starts[s + 1] - batch.seg_starts[s] for s in range(len(residents))]
        )
        device, dtype = self._device, self._memory.dtype
        return LoraStepPlan(
            num_rows=len(batch.rows),
            seg_row_starts=torch.tensor(batch.seg_starts, dtype=torch.int32, device=device),
            seg_pages=pages.to(device),
            seg_rank=ranks.to(device),
            seg_scale=scales.to(device),
            module_active=tuple(bool(v) for v in (ranks.sum(dim=1) > 0).tolist()),
            pools=self._memory.pools,
            kernel=self._kernel,
            row_pages=pages.long().repeat_interleave(lengths, dim=0).to(device),
            row_scale=scales.repeat_interleave(lengths, dim=1).to(device, dtype),
            rank_padding=_rank_padding(lengths.tolist(), [len(r.pages) for r in residents]),
        )

    @staticmethod
    def _pooled(
        out: object, mask: torch.Tensor, resident: Resident, lo: int, hi: int
    ) -> torch.Tensor:
        if resident.head.pooling == POOLING_CLS_POOLER:
            return out.pooler_output[lo:hi]
        hidden = out.last_hidden_state[lo:hi]
        weights = mask[lo:hi].unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _rank_padding(rows_per_segment: list[int], ranks: list[int]) -> float:
    """How much the gather kernel would compute beyond each row's own rank (1.0 = none)."""
    useful = sum(n * r for n, r in zip(rows_per_segment, ranks, strict=True))
    padded = sum(rows_per_segment) * max(ranks, default=0)
    return padded / useful if useful else 1.0
