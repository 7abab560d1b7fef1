"""int8 rootstock on the CPU: frozen Linear weights in int8, each input row quantised per call.

A one-row SMS step on this project's 2-core VM is bound by the backbone's Linear layers
(6 of 9 ms in float32). An int8 matmul (VNNI dot products) runs a MiniLM forward in 40-45% of
the float32 time. LoRA factors, heads, embeddings and LayerNorm stay in float32: only the frozen
Linear weights change, so adapters trained in float32 serve unchanged (benchmarks.precision
measures what it costs in answers).

Scales: one per weight output channel, one per input row (token). Another tenant's rows in the
step therefore never change a row's scale, which per-tensor activation scales (torch.ao's
dynamic quantisation, fbgemm) would: there one outlier token coarsens every tenant's rows in
the batch. A row's answer still moves a little with its step: packed and padded steps sum in a
different order, and a float difference that crosses a rounding boundary of the int8 input
moves the result (up to 7e-3 in a probability, measured on a random head).
Per-token scales were also closer to float32 on MiniLM (mean-pooled cosine 0.994
against 0.961, min 0.984 against 0.917, over five texts) at the same speed (3.9 against 3.7 ms
for one short row). torchao's eager int8 path ran the forward at 15.4 ms (float32 10.6 ms).
"""

import collections
import weakref

import torch
from torch import nn

QUANTIZE_MODES = ("none", "int8")


def check_quantize(mode: str, device: str, dtype: str) -> None:
    """Refuse what the int8 path cannot run, with the reason (called by EngineConfig)."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {mode!r}")
    if mode == "int8" and device != "cpu":
        raise ValueError(
            f"quantize='int8' runs on the CPU only, not on {device!r}: "
            "use dtype='bfloat16' or 'float16' on CUDA"
        )
    if mode == "int8" and dtype != "float32":
        raise ValueError(
            f"quantize='int8' takes float32 activations; got dtype={dtype!r} (use float32)"
        )


class SharedInput:
    """The input a group of sibling Int8Linears quantised last. Attention's query, key and
    value read one tensor: the first quantises it, the other two reuse that (per-row scales
    make it the same for all three). Held by weak reference, so a freed tensor never matches.
    One forward at a time, as the backbone's step state already requires."""

    __slots__ = ("quantized", "row_scale", "source")

    def __init__(self) -> None:
        self.source: weakref.ref[torch.Tensor] | None = None
        self.quantized = torch.empty(0, dtype=torch.int8)
        self.row_scale = torch.empty(0)

    def get(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is not None and self.source() is x:
            return self.quantized, self.row_scale
        self.quantized, self.row_scale = quantize_rows(rows)
        self.source = weakref.ref(x)
        return self.quantized, self.row_scale


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and their float32 scales [N, 1] (absmax / 127 per row)."""
    row_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127)
    return torch.div(rows, row_scale).round_().to(torch.int8), row_scale  # |value| <= 127


class Int8Linear(nn.Module):
    """``y = (q(x) @ W8) * s_x * s_w + b``: W8 int8 [in, out] with per-output-channel scales
    s_w, q(x) int8 with one scale s_x per row (absmax / 127). Accumulates in int32; float32 out.
    Inference only (no backward). Siblings given one ``shared`` quantise a common input once."""

    def __init__(self, linear: nn.Linear, shared: SharedInput | None = None) -> None:
        super().__init__()
        self.shared = shared
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127
        quantized = torch.round(weight / scale[:, None]).to(torch.int8)
        self.register_buffer("weight_t", quantized.t().contiguous())  # [in, out]
        self.register_buffer("weight_scale", scale)  # [out]
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.shared is None:
            quantized, row_scale = quantize_rows(rows)
        else:
            quantized, row_scale = self.shared.get(x, rows)
        out = torch._int_mm(quantized, self.weight_t).to(torch.float32).mul_(row_scale)
        out = (
            out.mul_(self.weight_scale)
            if self.bias is None
            else torch.addcmul(self.bias, out, self.weight_scale)
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_linears_int8(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``model`` in place by an Int8Linear. LoraLinear
    wrappers keep working: their ``base`` is swapped, not the wrapper. Linears of one owner
    module with one input width (attention's query, key, value) share a SharedInput: a
    sibling given another tensor simply quantises its own. Returns the number replaced."""
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]

    def group(name: str, linear: nn.Linear) -> tuple[str, int]:
        return name.removesuffix(".base").rpartition(".")[0], linear.in_features  # past LoRA

    sizes = collections.Counter(group(n, m) for n, m in targets)
    groups = {key: SharedInput() for key, size in sizes.items() if size > 1}
    for name, linear in targets:
        shared = groups.get(group(name, linear))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(linear, shared))
    return len(targets)
