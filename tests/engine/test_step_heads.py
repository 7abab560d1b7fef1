"""A step's heads in a few device ops (engine/step_heads.py) against each head on its own."""

import numpy as np
import pytest
import torch

from engine.adapters import POOLING_CLS_POOLER, POOLING_MEAN, Head
from engine.step_heads import head_probs

HIDDEN = 12


class _Pooler:
    def __init__(self, rows: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.by_pooling = {
            POOLING_MEAN: torch.randn(rows, HIDDEN, generator=gen),
            POOLING_CLS_POOLER: torch.randn(rows, HIDDEN, generator=gen),
        }
        self.calls = 0

    def pooled(self, pooling: str, lo: int, hi: int) -> torch.Tensor:
        self.calls += 1
        return self.by_pooling[pooling][lo:hi]


def _head(labels: int, pooling: str, seed: int) -> Head:
    gen = torch.Generator().manual_seed(seed)
    return Head(pooling, torch.randn(labels, HIDDEN, generator=gen), torch.randn(labels))


def _alone(head: Head, pooler: _Pooler, lo: int, hi: int) -> np.ndarray:
    logits = torch.nn.functional.linear(pooler.pooled(head.pooling, lo, hi), head.weight, head.bias)
    return torch.softmax(logits, dim=-1).numpy()


CASES = {
    "one head": ([0, 4], [(3, POOLING_MEAN)]),
    "one head beside backbone rows": ([0, 2, 5], [None, (2, POOLING_CLS_POOLER)]),
    "mixed labels and poolings": (
        [0, 1, 4, 6, 7, 10],
        [(2, POOLING_MEAN), (5, POOLING_CLS_POOLER), None, (1, POOLING_MEAN), (3, POOLING_MEAN)],
    ),
    "all [CLS]": ([0, 2, 3], [(4, POOLING_CLS_POOLER), (2, POOLING_CLS_POOLER)]),
    "only backbone rows": ([0, 3], [None]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_step_of_heads_answers_as_each_head_alone(case: str) -> None:
    starts, specs = CASES[case]
    heads = [_head(*spec, seed=i) if spec else None for i, spec in enumerate(specs)]
    pooler = _Pooler(starts[-1])
    got = head_probs(starts, heads, pooler)
    for s, head in enumerate(heads):
        if head is None:
            assert got[s] is None
            continue
        want = _alone(head, pooler, starts[s], starts[s + 1])
        assert got[s].shape == want.shape and got[s].dtype == np.float32
        np.testing.assert_allclose(got[s], want, rtol=1e-5, atol=1e-6)


def _aten_calls(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def test_device_op_calls_do_not_grow_with_the_heads() -> None:
    def calls(num_heads: int) -> int:
        starts = list(range(0, 2 * num_heads + 1, 2))
        heads = [_head(2 + s % 3, POOLING_MEAN, seed=s) for s in range(num_heads)]
        pooler = _Pooler(starts[-1])
        return _aten_calls(lambda: head_probs(starts, heads, pooler))

    # applied one segment at a time, each head cost about eight calls
    assert calls(32) == calls(8) == calls(2)
