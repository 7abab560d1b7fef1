"""PoolViews: the loop kernel's per-adapter views of the pools, kept between steps."""

import torch

from kernels import PoolViews, sgmv_lora_views, sgmv_reference


def _pools(seed: int = 0, pages: int = 32, width: int = 12):
    gen = torch.Generator().manual_seed(seed)
    slab = torch.randn(pages, 3 * width, generator=gen)
    # per-module pools are column views of one slab, as engine.memory lays them out
    return slab, [(slab[:, :width], slab[:, width : 2 * width])]


def test_views_are_the_pool_rows_and_follow_what_the_pages_hold() -> None:
    slab, pools = _pools()
    views = PoolViews(pools)
    a_t, b = views.factors(0, range(4, 12), 8)
    assert torch.equal(a_t, pools[0][0][4:12].t()) and torch.equal(b, pools[0][1][4:12])
    assert views.factors(0, range(4, 12), 8)[0] is a_t  # kept: no new device-op calls
    assert views.factors(0, range(4, 12), 4)[0].shape == (12, 4)  # another rank, its own view
    slab[4:12] = 7.0  # another adapter paged in on the same rows
    assert (views.factors(0, range(4, 12), 8)[0] == 7.0).all()


def test_scattered_pages_are_gathered_and_never_kept() -> None:
    _, pools = _pools()
    views = PoolViews(pools)
    a_t, b = views.factors(0, [9, 3, 5], 3)
    assert torch.equal(a_t, pools[0][0][[9, 3, 5]].t()) and torch.equal(b, pools[0][1][[9, 3, 5]])
    assert len(views) == 0


def test_views_are_bounded_and_the_least_recently_used_go_first() -> None:
    _, pools = _pools()
    views = PoolViews(pools, max_entries=3)
    hot = views.factors(0, range(1, 3), 2)
    for first in range(5, 20):
        assert views.factors(0, range(1, 3), 2) is hot  # used every time: never dropped
        views.factors(0, range(first, first + 2), 2)
        assert len(views) <= 3
    none_kept = PoolViews(pools, max_entries=0)
    none_kept.factors(0, range(1, 3), 2)
    assert len(none_kept) == 0


def test_sgmv_over_kept_views_matches_the_reference() -> None:
    slab, pools = _pools(seed=1)
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(7, 12, generator=gen), torch.randn(7, 12, generator=gen)
    starts, ranks, scales = [0, 3, 3, 7], [4, 2, 8], [0.5, 1.0, 2.0]
    pages = [range(1, 5), range(9, 11), [20, 12, 13, 30, 2, 6, 7, 8]]
    views = PoolViews(pools)
    for _ in range(2):  # the second pass reads the kept views
        expected = sgmv_reference(
            y,
            x,
            *pools[0],
            torch.tensor(starts, dtype=torch.int32),
            torch.tensor([list(p) + [0] * (8 - len(p)) for p in pages], dtype=torch.int32),
            torch.tensor(ranks, dtype=torch.int32),
            torch.tensor(scales),
        )
        sgmv_lora_views(y, x, views, 0, starts, pages, ranks, scales)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    assert len(views) == 1  # the empty segment's adapter and the scattered one are not kept
