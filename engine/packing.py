"""Unpadded steps: a batch's rows as one sequence, each row attending only to itself.

A padded step computes every row at the longest row's length; short requests that arrive
together with a long one (the bursts of a lightly loaded server) then pay for padding that
can be most of the step. Packed, the encoder's Linears see only real tokens; attention gets a
block-diagonal mask and per-row positions, so each row's hidden states are those of its padded
run. Masked, the attention scores grow with the square of the packed length, so only small
steps are packed (engine config ``pack_max_tokens``). The lean forward (engine/lean_encoder.py)
can instead attend row by row, which pays from ``_ROWS_APART_MIN_TOKENS`` up.

Whether a backbone computes the same thing packed is checked once, at load, on real text: an
encoder that ignores ``position_ids`` or builds positions its own way (RoBERTa counts from its
padding index) fails the check and is never packed.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.adapters import POOLING_CLS_POOLER, POOLING_FIRST
from engine.backbone import Backbone

# load-time checks of a backbone (packing here, static steps in engine/static_step.py) run it
# on these texts both ways and compare every real token's hidden state
CHECK_TEXTS = ("a short one", "and a somewhat longer second row, to check the packed attention")
# largest hidden-state difference accepted between a row padded and packed: float32 agrees to
# rounding; bfloat16 and int8 weights differ by up to 0.02 on MiniLM (one rounding step amplified
# through the layers), while a real fault (attention leaking across rows, positions ignored)
# differs by 0.65-1.35
_CHECK_TOLERANCE = 1e-4
_CHECK_TOLERANCE_LOW_PRECISION = 0.1
_MIN_WASTE = 0.2  # pack only when padding would be at least this share of the step
# most real tokens a step packs for a model's own forward: its one masked attention call
# computes scores between every two tokens of the step, a square that soon outgrows what
# packing saves (the lean forward attends row by row from _ROWS_APART_MIN_TOKENS up instead)
MASKED_MAX_TOKENS = 512
# packed length from which attending row by row beats one masked call on the CPU: at 240-500
# tokens of 5-20 rows it took a third to a quarter of the masked time; under 100 tokens the
# calls' overhead makes it up to twice as slow (MiniLM's 12 heads, one or two threads)
_ROWS_APART_MIN_TOKENS = 128


@dataclass(frozen=True, slots=True)
class PackedInputs:
    """Model inputs of a packed step, and where each row's tokens sit in the sequence."""

    input_ids: torch.Tensor  # int64 [1, N]
    position_ids: torch.Tensor  # int64 [1, N], restarting at 0 for every row
    # [1, 1, N, N] additive: 0 within a row, dtype min across rows; None where rows attend apart
    attention_mask: torch.Tensor | None
    token_starts: tuple[int, ...]  # [rows + 1] token offsets of the rows
    row_of_token: torch.Tensor  # int64 [N]


def worth_packing(
    token_ids: Sequence[Sequence[int]], max_tokens: int, *, any_padding: bool = False
) -> bool:
    """Steps within ``max_tokens`` whose padding would waste at least a fifth of the compute,
    or with ``any_padding`` (where the scheduler budgets real tokens) any padding at all."""
    if len(token_ids) < 2 or max_tokens <= 0:
        return False
    real = sum(len(row) for row in token_ids)
    padded = len(token_ids) * max(len(row) for row in token_ids)
    least_waste = 0.0 if any_padding else _MIN_WASTE
    return real <= max_tokens and real < padded and real <= (1 - least_waste) * padded


def pack(
    token_ids: Sequence[Sequence[int]],
    device: str,
    dtype: torch.dtype,
    *,
    rows_apart: bool = False,
) -> PackedInputs:
    """``token_ids`` as one sequence. With ``rows_apart`` (a forward that takes the rows'
    offsets) a long one gets no mask: its rows attend apart."""
    starts = [0]
    for row in token_ids:
        starts.append(starts[-1] + len(row))
    flat = [token for row in token_ids for token in row]
    positions = [p for row in token_ids for p in range(len(row))]
    rows = torch.repeat_interleave(torch.arange(len(token_ids)), torch.tensor(starts).diff())
    mask = None
    if not (rows_apart and len(flat) >= _ROWS_APART_MIN_TOKENS):
        same_row = rows[:, None] == rows[None, :]
        mask = torch.zeros(same_row.shape, dtype=dtype)
        mask = mask.masked_fill_(~same_row, torch.finfo(dtype).min)[None, None].to(device)
    return PackedInputs(
        input_ids=torch.tensor([flat], dtype=torch.long, device=device),
        position_ids=torch.tensor([positions], dtype=torch.long, device=device),
        attention_mask=mask,
        token_starts=tuple(starts),
        row_of_token=rows.to(device),
    )


class PackedOutputs:
    """Per-row poolings of a packed step's last hidden states ([1, N, H])."""

    def __init__(self, backbone: Backbone, hidden: torch.Tensor, inputs: PackedInputs) -> None:
        self._backbone = backbone
        self._hidden = hidden[0]
        self._inputs = inputs
        self._mean: torch.Tensor | None = None
        self._cls: torch.Tensor | None = None

    def pooled(self, pooling: str, lo: int, hi: int) -> torch.Tensor:
        """Rows ``lo:hi`` pooled; the [CLS] pooler must first have run (``run_pooler``)."""
        if pooling == POOLING_CLS_POOLER:
            assert self._cls is not None, "run_pooler() runs under the step's LoRA plan"
            return self._cls[lo:hi]
        if pooling == POOLING_FIRST:
            return self._hidden[list(self._inputs.token_starts[lo:hi])]
        if self._mean is None:
            starts = self._inputs.token_starts
            sums = torch.zeros(
                (len(starts) - 1, self._hidden.shape[1]),
                dtype=self._hidden.dtype,
                device=self._hidden.device,
            ).index_add_(0, self._inputs.row_of_token, self._hidden)
            lengths = torch.tensor(starts, device=sums.device).diff().clamp(min=1)
            self._mean = sums / lengths[:, None].to(sums.dtype)
        return self._mean[lo:hi]

    def run_pooler(self) -> None:
        """The model's [CLS] pooler over each row's first token (its LoRA rows see one token
        per row, as in a padded step)."""
        first = self._hidden[list(self._inputs.token_starts[:-1])]
        self._cls = pool_first_tokens(self._backbone.model, first)


class PaddedOutputs:
    """A padded step's model outputs, pooled on demand (``PackedOutputs``' twin): each pooling
    once over every row, so a step of many segments pools in a few device ops, not a few per
    segment."""

    __slots__ = ("_pooled", "mask", "out")

    def __init__(self, out: object, mask: torch.Tensor) -> None:
        self.out = out
        self.mask = mask
        self._pooled: dict[str, torch.Tensor] = {}

    def pooled(self, pooling: str, lo: int, hi: int) -> torch.Tensor:
        if pooling not in self._pooled:
            self._pooled[pooling] = _pool(self.out, self.mask, pooling, 0, self.mask.shape[0])
        return self._pooled[pooling][lo:hi]


def _pool(out: object, mask: torch.Tensor, pooling: str, lo: int, hi: int) -> torch.Tensor:
    """Rows ``lo:hi`` pooled as a head expects: the [CLS] pooler, the first token's hidden
    state, or the mean over real tokens."""
    if pooling == POOLING_CLS_POOLER:
        return out.pooler_output[lo:hi]
    if pooling == POOLING_FIRST:
        return out.last_hidden_state[lo:hi, 0]
    hidden = out.last_hidden_state[lo:hi]
    weights = mask[lo:hi].unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def check_tolerance(backbone: Backbone, dtype: torch.dtype) -> float:
    """The largest hidden-state difference a load-time check accepts for this precision."""
    exact = dtype == torch.float32 and backbone.quantize == "none"
    return _CHECK_TOLERANCE if exact else _CHECK_TOLERANCE_LOW_PRECISION


def pool_first_tokens(model: torch.nn.Module, first: torch.Tensor) -> torch.Tensor:
    """The model's [CLS] pooler over first tokens ``[rows, hidden]``: BERT's pooler module
    takes a sequence and pools its first token; ALBERT's is a bare Linear, its tanh applied
    beside it by the model's forward."""
    pooled = model.pooler(first[:, None, :])
    if pooled.dim() == 3:  # a Linear over the one-token sequence
        activation = getattr(model, "pooler_activation", None)
        pooled = pooled[:, 0] if activation is None else activation(pooled[:, 0])
    return pooled


def packing_works(backbone: Backbone, device: str, dtype: torch.dtype) -> bool:
    """Run two texts padded and packed (no LoRA): True when every row's hidden states agree,
    and its [CLS] pooler's outputs, where it has one, as packed steps compute them."""
    model = backbone.model
    token_ids, ids, mask, inputs, tolerance = check_inputs(backbone, device, dtype)
    try:
        with torch.inference_mode():
            padded = model(input_ids=ids, attention_mask=mask)
            packed = model(
                input_ids=inputs.input_ids,
                attention_mask=inputs.attention_mask,
                position_ids=inputs.position_ids,
            )
    except Exception:  # noqa: BLE001 - no position_ids, no 4-D masks, Longformer's IndexError
        return False
    hidden = packed.last_hidden_state[0]
    for i, row in enumerate(token_ids):
        lo, hi = inputs.token_starts[i], inputs.token_starts[i + 1]
        expected = padded.last_hidden_state[i, : len(row)]
        if not torch.allclose(hidden[lo:hi].float(), expected.float(), atol=tolerance):
            return False
    expected = getattr(padded, "pooler_output", None)
    if expected is None:
        return True
    with torch.inference_mode():
        pooled = pool_first_tokens(model, hidden[list(inputs.token_starts[:-1])])
    return pooled.shape == expected.shape and torch.allclose(
        pooled.float(), expected.float(), atol=tolerance
    )


def check_padding_is_neutral(backbone: Backbone, device: str, dtype: torch.dtype) -> None:
    """ValueError unless each check text, padded beside a longer one, gets the hidden states
    (and [CLS] pooler output) it gets alone. A step holds many tenants' texts: a model that
    mixes padding into real tokens (FNet's Fourier transform, Funnel's pooling) would answer
    one tenant's text by what another's made its step."""
    model = backbone.model
    token_ids, ids, mask, _, tolerance = check_inputs(backbone, device, dtype)
    worst = 0.0
    with torch.inference_mode():
        padded = model(input_ids=ids, attention_mask=mask)
        for i, row in enumerate(token_ids):
            alone = model(
                input_ids=ids[i : i + 1, : len(row)], attention_mask=mask[i : i + 1, : len(row)]
            )
            pairs = [(padded.last_hidden_state[i, : len(row)], alone.last_hidden_state[0])]
            pooled = getattr(padded, "pooler_output", None)
            if pooled is not None:
                pairs.append((pooled[i], alone.pooler_output[0]))
            for got, expected in pairs:
                worst = max(worst, (got.float() - expected.float()).abs().max().item())
    if worst > tolerance:
        raise ValueError(
            f"{backbone.name} ({backbone.model_type}) answers a text differently when it is "
            f"padded beside a longer one (hidden states differ by up to {worst:.3g}): graft "
            "serves many tenants' texts in one step, so it cannot serve this model"
        )


def check_inputs(
    backbone: Backbone, device: str, dtype: torch.dtype
) -> tuple[list[list[int]], torch.Tensor, torch.Tensor, PackedInputs, float]:
    """What a load-time check runs: ``CHECK_TEXTS``' ids, padded (ids and 0/1 mask) and packed,
    on ``device``, and the tolerance the comparison takes."""
    token_ids = [backbone.tokenizer(text)["input_ids"] for text in CHECK_TEXTS]
    width = max(len(row) for row in token_ids)
    ids = torch.zeros((len(token_ids), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(token_ids):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    packed = pack(token_ids, device, dtype)
    return token_ids, ids.to(device), mask.to(device), packed, check_tolerance(backbone, dtype)
