"""The Triton SGMV kernels against the float32 reference over named segment patterns.

On CPU-only machines they run in Triton's interpreter (tests/conftest.py sets
``TRITON_INTERPRET=1``); with CUDA, the ``gpu`` class runs the compiled kernels.

Tolerances are per input dtype, as ``(rtol, atol)`` of ``torch.testing.assert_close``
against the float32 reference computed from the same (rounded) inputs. Outputs are O(1):
x ~ N(0, 1), pool rows ~ N(0, 0.1), y ~ N(0, 0.1). fp32 differs only by summation order;
fp16 and bf16 add the rounding of the output into y's dtype (half an ulp: 2^-11 and 2^-8
relative); the shrink result stays float32 into the expand product.
"""

import logging
from pathlib import Path

import pytest
import torch

from kernels import sgmv_reference

pytest.importorskip("triton", reason="the Triton kernels need triton installed")

import kernels.triton_sgmv as triton_sgmv  # noqa: E402
from engine.lora_kernels import kernel_for  # noqa: E402
from kernels.triton_fused import sgmv_lora_triton_fused  # noqa: E402
from kernels.triton_sgmv import (  # noqa: E402
    IS_INTERPRETED,
    padded_rank,
    sgmv_expand,
    sgmv_lora_triton,
    sgmv_shrink,
)

LORA_KERNELS = {"two-launch": sgmv_lora_triton, "fused": sgmv_lora_triton_fused}

TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}
DTYPES = list(TOLERANCES)
# (segment lengths, ranks): rank 0 is a segment whose adapter does not target this module
PATTERNS = {
    "one-adapter": ([37], [8]),
    "row-per-adapter": ([1] * 12, [4, 8, 16, 8, 4, 8, 16, 8, 4, 8, 16, 64]),
    "uniform": ([10, 10, 10, 10], [8, 16, 8, 16]),
    "zipf": ([40, 12, 5, 3, 1, 1], [8, 16, 4, 8, 32, 64]),
    "empty-segments": ([5, 0, 7, 0, 3], [8, 8, 4, 16, 4]),
    "mixed-ranks": ([3, 4, 2, 5, 3, 2, 4], [1, 4, 12, 33, 64, 16, 7]),
    "rows-without-adapter": ([5, 7, 3, 4], [0, 8, 0, 16]),
}
SCALES = [2.0, 0.5, 1.0, 4.0, 1.5, 0.25]
NUM_PAGES = 400

needs_interpreter = pytest.mark.skipif(
    not IS_INTERPRETED, reason="Triton's interpreter is off (CUDA present): TestOnCuda runs these"
)


def _case(
    segments: tuple[list[int], list[int]],
    dim_in: int,
    dim_out: int,
    dtype: torch.dtype,
    device: str = "cpu",
):
    """y, x, pools and segment metadata; pages are scattered, some segments' contiguous."""
    lengths, ranks = segments
    gen = torch.Generator().manual_seed(len(lengths) * 1000 + dim_in)
    a_pool = torch.randn(NUM_PAGES, dim_in, generator=gen) * 0.1
    b_pool = torch.randn(NUM_PAGES, dim_out, generator=gen) * 0.1
    a_pool[0], b_pool[0] = 0.0, 0.0  # the reserved zero page
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    pages = torch.zeros(len(ranks), max(ranks), dtype=torch.int32)
    perm = torch.randperm(NUM_PAGES - 1, generator=gen) + 1
    cursor = 0
    for s, r in enumerate(ranks):
        if s % 3 == 1:  # a contiguous run, as the allocator prefers, placed past the rest
            pages[s, :r] = torch.arange(NUM_PAGES - 64, NUM_PAGES - 64 + r)
        else:
            pages[s, :r] = perm[cursor : cursor + r]
            cursor += r
    x = torch.randn(starts[-1], dim_in, generator=gen)
    y = torch.randn(starts[-1], dim_out, generator=gen) * 0.1
    scales = torch.tensor([SCALES[s % len(SCALES)] for s in range(len(ranks))])

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype)

    meta = (
        torch.tensor(starts, dtype=torch.int32, device=device),
        pages.to(device),
        torch.tensor(ranks, dtype=torch.int32, device=device),
        scales.to(device, torch.float32),
    )
    return put(y), put(x), put(a_pool), put(b_pool), meta


def _check_lora(
    segments: tuple[list[int], list[int]],
    dim_in: int,
    dim_out: int,
    dtype: torch.dtype,
    device: str,
    lora=sgmv_lora_triton,
) -> None:
    y, x, a_pool, b_pool, meta = _case(segments, dim_in, dim_out, dtype, device)
    expected = sgmv_reference(
        y.cpu(), x.cpu(), a_pool.cpu(), b_pool.cpu(), *(m.cpu() for m in meta)
    )
    out = y.clone()
    lora(out, x, a_pool, b_pool, *meta)
    assert out.dtype == dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float().cpu(), expected, rtol=rtol, atol=atol)
    starts, _, ranks, _ = (m.cpu().tolist() for m in meta)
    for s, rank in enumerate(ranks):  # rank-0 segments are left bit for bit
        if rank == 0:
            assert torch.equal(out[starts[s] : starts[s + 1]], y[starts[s] : starts[s + 1]])


def _check_shrink(pattern: str, dim_in: int, dtype: torch.dtype, device: str) -> None:
    segments = PATTERNS[pattern]
    _, x, a_pool, _, (starts, pages, ranks, _) = _case(segments, dim_in, 16, dtype, device)
    v = sgmv_shrink(x, a_pool, starts, pages, ranks, max_rank=pages.shape[1])
    assert v.dtype == torch.float32 and v.shape == (x.shape[0], padded_rank(pages.shape[1]))
    rtol, atol = TOLERANCES[dtype]
    bounds, ranks_list = starts.tolist(), ranks.tolist()
    for s, rank in enumerate(ranks_list):
        lo, hi = bounds[s], bounds[s + 1]
        a = a_pool[pages[s, :rank].long()].float()
        expected = x[lo:hi].float() @ a.t()
        torch.testing.assert_close(v[lo:hi, :rank], expected, rtol=rtol, atol=atol)
        assert not v[lo:hi, rank:].any()  # padding columns, and whole rank-0 rows, are zero


@needs_interpreter
@pytest.mark.parametrize("kernel", list(LORA_KERNELS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_patterns_match_reference(pattern: str, dtype: torch.dtype, kernel: str) -> None:
    _check_lora(PATTERNS[pattern], 384, 384, dtype, "cpu", LORA_KERNELS[kernel])


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("dim_in", "dim_out"), [(768, 768), (1024, 1024), (100, 100), (384, 1536), (1536, 384)]
)
@pytest.mark.parametrize("kernel", list(LORA_KERNELS))
def test_hidden_sizes_match_reference(
    dim_in: int, dim_out: int, dtype: torch.dtype, kernel: str
) -> None:
    _check_lora(PATTERNS["zipf"], dim_in, dim_out, dtype, "cpu", LORA_KERNELS[kernel])


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", ["mixed-ranks", "empty-segments", "rows-without-adapter"])
def test_shrink_is_x_times_a_transposed(pattern: str, dtype: torch.dtype) -> None:
    _check_shrink(pattern, 100, dtype, "cpu")


@needs_interpreter
def test_expand_alone_adds_scaled_update() -> None:
    y, x, a_pool, b_pool, (starts, pages, ranks, scales) = _case(
        PATTERNS["zipf"], 96, 200, torch.float32
    )
    v = sgmv_shrink(x, a_pool, starts, pages, ranks, max_rank=pages.shape[1])
    out = y.clone()
    sgmv_expand(out, v, b_pool, starts, pages, ranks, scales)
    expected = sgmv_reference(y, x, a_pool, b_pool, starts, pages, ranks, scales)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@needs_interpreter
@pytest.mark.parametrize("kernel", list(LORA_KERNELS))
def test_one_row(kernel: str) -> None:
    _check_lora(([1], [16]), 384, 384, torch.float32, "cpu", LORA_KERNELS[kernel])


@needs_interpreter
@pytest.mark.parametrize("kernel", list(LORA_KERNELS))
def test_thousands_of_rows(kernel: str) -> None:
    segments = ([1800, 700, 1, 0, 499], [8, 64, 4, 8, 0])
    _check_lora(segments, 64, 64, torch.float32, "cpu", LORA_KERNELS[kernel])


@needs_interpreter
@pytest.mark.parametrize("kernel", list(LORA_KERNELS))
def test_strided_views_and_nothing_to_do(kernel: str) -> None:
    """The engine hands reshaped views; a batch with no LoRA at all launches nothing."""
    y, x, a_pool, b_pool, (starts, pages, ranks, scales) = _case(
        PATTERNS["uniform"], 100, 100, torch.float32
    )
    wide_x = torch.zeros(x.shape[0], 2 * x.shape[1])
    wide_x[:, ::2] = x
    wide_y = torch.zeros(y.shape[0], y.shape[1] + 28)
    out = wide_y[:, 28:]
    out.copy_(y)
    lora = LORA_KERNELS[kernel]
    lora(out, wide_x[:, ::2], a_pool, b_pool, starts, pages, ranks, scales)
    expected = sgmv_reference(y, x, a_pool, b_pool, starts, pages, ranks, scales)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert not wide_y[:, :28].any()
    untouched = y.clone()
    lora(untouched, x, a_pool, b_pool, starts, pages, torch.zeros_like(ranks), scales)
    assert torch.equal(untouched, y)


@pytest.mark.parametrize("kernel", list(LORA_KERNELS))
def test_mismatched_operands_raise(kernel: str) -> None:
    y, x, a_pool, b_pool, meta = _case(PATTERNS["one-adapter"], 64, 64, torch.float32)
    lora = LORA_KERNELS[kernel]
    with pytest.raises(ValueError):
        lora(y, x.half(), a_pool, b_pool, *meta)
    with pytest.raises(ValueError):
        lora(y, x, a_pool, b_pool[:, :32], *meta)
    with pytest.raises(ValueError, match="rows"):
        lora(y[:-1], x, a_pool, b_pool, *meta)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or IS_INTERPRETED,
    reason="needs CUDA and compiled (not interpreted) Triton",
)
class TestOnCuda:
    """The same comparisons with CUDA tensors through the compiled kernels."""

    @pytest.mark.parametrize("kernel", list(LORA_KERNELS))
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("pattern", list(PATTERNS))
    @pytest.mark.parametrize(("dim_in", "dim_out"), [(384, 384), (768, 3072), (100, 100)])
    def test_patterns_match_reference(
        self, pattern: str, dim_in: int, dim_out: int, dtype: torch.dtype, kernel: str
    ) -> None:
        _check_lora(PATTERNS[pattern], dim_in, dim_out, dtype, "cuda", LORA_KERNELS[kernel])

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_shrink_is_x_times_a_transposed(self, dtype: torch.dtype) -> None:
        _check_shrink("mixed-ranks", 1024, dtype, "cuda")


TEXTS = ["WIN a car, text CLAIM now!", "lunch tomorrow?", "ok"]


@needs_interpreter
def test_runner_triton_equals_segment_loop(backbone, write_random_adapter, tmp_path: Path) -> None:
    """A tiny mixed batch (three adapters, one without LoRA) scores the same on both kernels."""
    from engine.adapters import parse_adapter
    from engine.lora_kernels import SegmentLoop
    from engine.lora_triton import TritonSgmv
    from engine.memory import AdapterMemory
    from engine.runner import ModelRunner
    from scheduler import Batch

    memory = AdapterMemory(backbone, num_pages=64, device="cpu", dtype=torch.float32)
    keys = []
    for i, (rank, targets) in enumerate([(8, ("query", "value")), (4, ("value",)), (0, ())]):
        out_dir = tmp_path / f"a{i}"
        write_random_adapter(backbone, out_dir, seed=i, rank=rank, num_labels=2, targets=targets)
        weights = parse_adapter(
            (out_dir / "adapter_config.json").read_bytes(),
            (out_dir / "adapter_model.safetensors").read_bytes(),
            ("neg", "pos"),
            "mean",
            backbone,
        )
        keys.append(f"t/m{i}@1")
        memory.acquire(keys[-1], lambda w=weights: w)
    token_ids = backbone.tokenizer(TEXTS)["input_ids"]
    batch = Batch.of(keys, [len(t) for t in token_ids])
    assert batch.seg_starts == (0, 1, 2, 3)

    class CountingTriton(TritonSgmv):
        num_calls = 0

        def apply(self, *args) -> None:
            CountingTriton.num_calls += 1
            super().apply(*args)

    loop = ModelRunner(backbone, memory, "cpu", SegmentLoop()).step(batch, token_ids)
    triton = ModelRunner(backbone, memory, "cpu", CountingTriton()).step(batch, token_ids)
    assert CountingTriton.num_calls == 12  # query and value of six layers
    fused = ModelRunner(backbone, memory, "cpu", TritonSgmv(fused=True)).step(batch, token_ids)
    # the CUDA default: a step of two LoRA adapters loops; with a lower bar it launches
    from engine.lora_kernels import AutoCuda

    auto_loop = ModelRunner(backbone, memory, "cpu", AutoCuda()).step(batch, token_ids)
    auto_triton = ModelRunner(backbone, memory, "cpu", AutoCuda(1)).step(batch, token_ids)
    for expected, *got in zip(loop, triton, fused, auto_loop, auto_triton, strict=True):
        for answer in got:
            torch.testing.assert_close(
                torch.from_numpy(answer), torch.from_numpy(expected), atol=1e-4, rtol=0
            )


def test_triton_on_the_cpu_is_allowed_only_where_triton_interprets(monkeypatch, caplog):
    """The check read TRITON_INTERPRET as it is now, not as Triton read it at import: set
    after, every step failed; set to "true", a working interpreter was refused."""
    monkeypatch.setattr(triton_sgmv, "IS_INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        kernel_for("triton", "cpu")
    monkeypatch.setattr(triton_sgmv, "IS_INTERPRETED", True)
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    assert kernel_for("triton-fused", "cpu") is not None
    with caplog.at_level(logging.WARNING, logger="engine.lora_kernels"):
        kernel_for("auto", "cuda")
    assert "run in Triton's interpreter" in caplog.text
