"""A BERT- or DistilBERT-layout encoder's forward pass in plain torch calls, for serving.

transformers' forward of a 6-layer MiniLM calls about 150 modules a step, each through
``nn.Module.__call__``, plus keyword plumbing, deprecation wrappers, an ``inspect.signature``
per layer and a mask built for the general case. On a one-row int8 CPU step that was 1.5-2.4
ms of 8-11, paid by every small step of a lightly loaded server (``benchmarks.profile_step
--compare-forward``). This forward runs the same modules' weights with the same
torch ops, calling the Linears (LoRA wrappers, int8 bases) directly.

It is used only for a model that passes ``lean_encoder``'s check at load: the layout of
BERT (RoBERTa, ELECTRA and others share it) or DistilBERT, and the same hidden states as the
model's own forward on real text, padded and packed. Anything else, or any transformers
change that makes the two disagree, serves through the model's own forward. Inference only:
no dropout, no gradients, no cache.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.lora import StepLora
from engine.packing import check_inputs

if TYPE_CHECKING:
    from engine.backbone import Backbone


@dataclass(frozen=True, slots=True)
class EncoderOutput:
    """What serving reads of a forward pass."""

    last_hidden_state: torch.Tensor  # [B, T, H]
    # the [CLS] pooler's output, computed inside the pass (as the model does) since the
    # pooler's Linear may carry LoRA, which only applies while the step's plan is set
    pooler_output: torch.Tensor | None


Op = Callable[[torch.Tensor], torch.Tensor]
# what attention takes: an additive bias (or None, every token sees every other), or the token
# offsets of a packed step's rows, each row attending only to itself
Mask = torch.Tensor | Sequence[int] | None


@dataclass(frozen=True, slots=True)
class _Attention:
    """Self-attention's projections: the modules' own ``forward`` (no hooks, no ``__call__``)."""

    query: Op
    key: Op
    value: Op
    heads: int
    head_size: int
    scaling: float

    def __call__(self, h: torch.Tensor, mask: Mask, batch: int, length: int) -> torch.Tensor:
        shape = (batch, length, self.heads, self.head_size)
        q = self.query(h).view(shape).transpose(1, 2)
        k = self.key(h).view(shape).transpose(1, 2)
        v = self.value(h).view(shape).transpose(1, 2)
        if mask is None or isinstance(mask, torch.Tensor):
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
        else:  # one packed sequence: each row's scores alone, none across rows
            context = torch.cat(
                [
                    F.scaled_dot_product_attention(
                        q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], scale=self.scaling
                    )
                    for lo, hi in zip(mask[:-1], mask[1:], strict=True)
                ],
                dim=2,
            )
        return context.transpose(1, 2).reshape(batch * length, -1)


@dataclass(frozen=True, slots=True)
class _Layer:
    """One layer's callables. BERT's blocks are attention (with its output Linear and norm),
    the feed-forward's first Linear, and its second with the output norm; DistilBERT's are
    attention, its norm, the whole feed-forward, and the output norm (``split_norms``). The
    block hooks pause before each block, so this forward pauses at the same points."""

    attention: _Attention
    attention_out: Op
    attention_norm: nn.LayerNorm
    intermediate: Op
    activation: Op
    out: Op
    out_norm: nn.LayerNorm
    split_norms: bool  # DistilBERT: each norm is a block of its own


class LeanEncoder:
    """``model``'s forward for ``input_ids`` [B, T] with a 2-D padding mask [B, T] or a 4-D
    additive mask [B, 1, T, T] (packed steps), and optional ``position_ids``. A packed step
    may pass ``row_starts`` (its rows' token offsets) instead of a 4-D mask: attention then
    runs row by row, in time linear in the packed length rather than square.

    Calls ``state.between_layers`` where the model's block hooks would (engine/backbone.py):
    before every block of every layer (see `_Layer`) but the first. Keeps nothing between
    calls, so a whole nested forward may run at any of those points.
    """

    def __init__(self, model: nn.Module, layers: list[_Layer], state: StepLora) -> None:
        self._embeddings = model.embeddings
        self._project = getattr(model, "embeddings_project", None)  # ELECTRA-small's
        self._pooler = getattr(model, "pooler", None)
        self._layers = layers
        self._state = state

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None = None,
        row_starts: Sequence[int] | None = None,
    ) -> EncoderOutput:
        batch, length = input_ids.shape
        hidden = self._embeddings(input_ids=input_ids, position_ids=position_ids)
        if self._project is not None:
            hidden = self._project(hidden)
        width = hidden.shape[-1]
        h = hidden.reshape(batch * length, width)
        mask: Mask = row_starts
        if row_starts is None:
            assert attention_mask is not None, "a mask or the packed rows' offsets"
            mask = _attention_bias(attention_mask, hidden.dtype)
        for i, layer in enumerate(self._layers):
            if i > 0:
                self._pause()
            h = self._layer(layer, h, mask, batch, length)
        hidden = h.view(batch, length, width)
        pooled = self._pooler(hidden) if self._pooler is not None else None
        return EncoderOutput(hidden, pooled)

    def _pause(self) -> None:
        callback = self._state.between_layers  # read at each point, as the hooks read it
        if callback is not None:
            callback()

    def _layer(
        self, layer: _Layer, h: torch.Tensor, mask: Mask, batch: int, length: int
    ) -> torch.Tensor:
        attended = layer.attention_out(layer.attention(h, mask, batch, length)).add_(h)
        if layer.split_norms:
            self._pause()
        attended = _norm(layer.attention_norm, attended)
        self._pause()
        inner = layer.activation(layer.intermediate(attended))
        if not layer.split_norms:
            self._pause()
        out = layer.out(inner).add_(attended)
        if layer.split_norms:
            self._pause()
        return _norm(layer.out_norm, out)


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """What SDPA adds to the attention scores, made once per pass, not once per layer.

    A 4-D mask (packed rows) is additive already, as transformers takes it. A 2-D padding
    mask becomes 0 where a token may attend and -inf where not: what SDPA makes of the boolean
    mask transformers passes it, at every layer. With no padding on the CPU (where the check
    costs no device sync) there is no mask at all, as transformers then passes none."""
    if attention_mask.dim() == 4:
        return attention_mask
    if attention_mask.device.type == "cpu" and bool(attention_mask.all()):
        return None
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(attention_mask == 0, float("-inf"))[:, None, None]


def lean_encoder(backbone: "Backbone", dtype: torch.dtype) -> LeanEncoder | None:
    """A LeanEncoder for ``backbone`` if its model has BERT's or DistilBERT's layout and the
    lean forward gives its hidden states on real text, padded and packed; None otherwise."""
    model = backbone.model
    layers = _layers(model)
    if layers is None:
        return None
    lean = LeanEncoder(model, layers, backbone.lora_state)
    return lean if _agrees(backbone, lean, dtype) else None


def _layers(model: nn.Module) -> list[_Layer] | None:
    """Each layer's parts, or None where the model is not laid out (or configured) as BERT or
    DistilBERT."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_decoder", False):
        return None
    if getattr(config, "add_cross_attention", False):
        return None
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return None
    if not hasattr(model, "embeddings"):
        return None
    for stack_owner, layer_of in (("encoder", _bert_layer), ("transformer", _distilbert_layer)):
        stack = getattr(getattr(model, stack_owner, None), "layer", None)
        if isinstance(stack, nn.ModuleList):
            try:
                return [layer_of(layer) for layer in stack]
            except (AttributeError, TypeError):
                return None
    return None


def _bert_layer(layer: nn.Module) -> _Layer:
    attention, out = layer.attention.self, layer.attention.output
    return _Layer(
        attention=_attention(attention, ("query", "key", "value"), "num_attention_heads"),
        attention_out=out.dense.forward,
        attention_norm=_checked_norm(out.LayerNorm),
        intermediate=layer.intermediate.dense.forward,
        activation=layer.intermediate.intermediate_act_fn,
        out=layer.output.dense.forward,
        out_norm=_checked_norm(layer.output.LayerNorm),
        split_norms=False,
    )


def _distilbert_layer(layer: nn.Module) -> _Layer:
    attention, ffn = layer.attention, layer.ffn
    return _Layer(
        attention=_attention(attention, ("q_lin", "k_lin", "v_lin"), "n_heads"),
        attention_out=attention.out_lin.forward,
        attention_norm=_checked_norm(layer.sa_layer_norm),
        intermediate=ffn.lin1.forward,
        activation=ffn.activation,
        out=ffn.lin2.forward,
        out_norm=_checked_norm(layer.output_layer_norm),
        split_norms=True,
    )


def _attention(owner: nn.Module, projections: tuple[str, str, str], heads: str) -> _Attention:
    query, key, value = (getattr(owner, name).forward for name in projections)
    head_size = int(owner.attention_head_size)
    return _Attention(
        query=query,
        key=key,
        value=value,
        heads=int(getattr(owner, heads)),
        head_size=head_size,
        scaling=float(getattr(owner, "scaling", head_size**-0.5)),
    )


def _checked_norm(module: object) -> nn.LayerNorm:
    if not isinstance(module, nn.LayerNorm):
        raise TypeError("not LayerNorm")
    return module


def _agrees(backbone: "Backbone", lean: LeanEncoder, dtype: torch.dtype) -> bool:
    """Both forwards on the load-time checks' texts, padded and packed (the lean one with a
    mask and row by row): True when every real token's hidden state and every pooled output
    agree within those checks' tolerance."""
    model, device = backbone.model, str(next(backbone.model.parameters()).device)
    _, ids, mask, packed, tolerance = check_inputs(backbone, device, dtype)
    try:
        with torch.inference_mode():
            expected = model(input_ids=ids, attention_mask=mask)
            padded = _close(expected, lean(ids, mask), mask.bool(), tolerance)
            inputs = (packed.input_ids, packed.attention_mask, packed.position_ids)
            expected = model(input_ids=inputs[0], attention_mask=inputs[1], position_ids=inputs[2])
            masked = _close(expected, lean(*inputs), None, tolerance)
            if device != "cpu":  # only CPU steps are packed: rows never attend apart there
                return padded and masked
            rows_apart = lean(inputs[0], None, inputs[2], row_starts=packed.token_starts)
            return padded and masked and _close(expected, rows_apart, None, tolerance)
    except (TypeError, ValueError, RuntimeError, AttributeError):  # what the model refuses
        return False


def _close(
    expected: object, got: EncoderOutput, real: torch.Tensor | None, tolerance: float
) -> bool:
    hidden, want = got.last_hidden_state.float(), expected.last_hidden_state.float()
    if real is not None:
        hidden, want = hidden[real], want[real]
    if not torch.allclose(hidden, want, atol=tolerance):
        return False
    pooled = getattr(expected, "pooler_output", None)
    if pooled is None:
        return got.pooler_output is None
    return got.pooler_output is not None and torch.allclose(
        got.pooler_output.float(), pooled.float(), atol=tolerance
    )
