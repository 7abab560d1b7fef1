"""The CPU SGMV path against the float32 reference over named segment patterns."""

import pytest
import torch

from kernels import sgmv_lora, sgmv_reference


def _case(pattern: str, hidden: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    num_pages = 256
    a_pool = torch.randn(num_pages, hidden, generator=gen) * 0.1
    b_pool = torch.randn(num_pages, hidden, generator=gen) * 0.1
    if pattern == "one-adapter":
        lengths, ranks = [37], [8]
    elif pattern == "row-per-adapter":
        lengths, ranks = [1] * 12, [4, 8, 16, 8, 4, 8, 16, 8, 4, 8, 16, 8]
    elif pattern == "zipf":
        lengths, ranks = [40, 12, 5, 3, 1, 1], [8, 16, 4, 8, 32, 64]
    elif pattern == "empty-and-none":
        lengths, ranks = [5, 0, 7, 3], [8, 8, 0, 4]
    else:
        raise ValueError(pattern)
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    max_rank = max(ranks)
    pages = torch.zeros(len(ranks), max_rank, dtype=torch.int32)
    perm = torch.randperm(num_pages, generator=gen)
    cursor = 0
    for s, r in enumerate(ranks):
        if pattern == "zipf" and s % 2:  # contiguous pages for some segments: the view path
            first = 200 + s
            pages[s, :r] = torch.arange(first, first + r) % num_pages
        else:
            pages[s, :r] = perm[cursor : cursor + r]
            cursor += r
    x = torch.randn(starts[-1], hidden, generator=gen)
    y = torch.randn(starts[-1], hidden, generator=gen)
    scales = torch.tensor([2.0, 0.5, 1.0, 4.0, 1.5, 0.25][: len(ranks)] + [1.0] * 12)[: len(ranks)]
    meta = (
        torch.tensor(starts, dtype=torch.int32),
        pages,
        torch.tensor(ranks, dtype=torch.int32),
        scales.float(),
    )
    return y, x, a_pool, b_pool, meta


@pytest.mark.parametrize("pattern", ["one-adapter", "row-per-adapter", "zipf", "empty-and-none"])
@pytest.mark.parametrize("hidden", [384, 768])
def test_sgmv_matches_reference(pattern: str, hidden: int) -> None:
    y, x, a_pool, b_pool, (starts, pages, ranks, scales) = _case(pattern, hidden)
    expected = sgmv_reference(y, x, a_pool, b_pool, starts, pages, ranks, scales)
    out = y.clone()
    sgmv_lora(out, x, a_pool, b_pool, starts, pages, ranks, scales)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_rank_zero_segment_is_untouched() -> None:
    y, x, a_pool, b_pool, (starts, pages, ranks, scales) = _case("empty-and-none", 384)
    out = y.clone()
    sgmv_lora(out, x, a_pool, b_pool, starts, pages, ranks, scales)
    lo, hi = int(starts[2]), int(starts[3])  # the rank-0 segment
    assert torch.equal(out[lo:hi], y[lo:hi])
    assert not torch.equal(out[: int(starts[1])], y[: int(starts[1])])
