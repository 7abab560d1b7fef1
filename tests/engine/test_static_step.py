"""Fixed-shape steps (engine/static_step.py), run eagerly on the CPU: the same answers as the
regular step, and nothing in their forward that would wait for a device (which a CUDA graph
capture forbids). The capture itself needs a GPU: tests/engine/test_cuda.py."""

from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from engine.lora_kernels import kernel_for
from engine.runner import BACKBONE_KEY, ModelRunner
from engine.static_step import ROW_BUCKETS, Shape, bucket, shape_of
from scheduler import Batch
from tests.engine.mixed_fleet import TEXTS, assert_rows_close, publish_fleet, resident_pool

# calls that read a device tensor on the host: each waits for the device
_WAITS = {"__bool__", "item", "tolist", "cpu", "numpy", "nonzero", "all", "any", "__index__"}


class _NoWaits(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in _WAITS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def fleet(backbone, tmp_path: Path, publish_random):
    from registry import Registry

    registry = Registry(tmp_path / "reg")
    yield resident_pool(backbone, registry, publish_fleet(registry, publish_random))
    registry.close()


def _runners(backbone, memory):
    regular = ModelRunner(backbone, memory, "cpu", kernel_for("auto", "cpu"))
    static = ModelRunner(backbone, memory, "cpu", kernel_for("auto", "cpu"), static_max_tokens=8192)
    return regular, static


def _mixed_batch(backbone, keys: list[str], rows: int):
    ids = backbone.tokenizer(TEXTS)["input_ids"]
    pairs = sorted((keys[i % len(keys)], i) for i in range(rows))
    token_ids = [ids[i % len(TEXTS)] for _, i in pairs]
    return Batch.of([k for k, _ in pairs], [len(t) for t in token_ids]), token_ids


@pytest.mark.parametrize("rows", [1, 5, 12])
def test_a_static_step_answers_as_the_regular_step(backbone, fleet, rows: int) -> None:
    memory, keys = fleet
    regular, static = _runners(backbone, memory)
    batch, token_ids = _mixed_batch(backbone, [*keys, BACKBONE_KEY], rows)
    expected = regular.step(batch, token_ids)
    got = static.step(batch, token_ids)
    assert static.num_static_steps == 1 and regular.num_static_steps == 0
    assert_rows_close(got, expected)  # backbone rows too: every pooling, for head-only models


def test_one_static_step_serves_every_step_of_its_shape(backbone, fleet) -> None:
    memory, keys = fleet
    _, static = _runners(backbone, memory)
    for rows in (5, 6, 7, 8):  # one row bucket; the buffers are refilled each time
        batch, token_ids = _mixed_batch(backbone, keys, rows)
        static.step(batch, token_ids)
    assert static.num_static_steps == 4 and len(static._static) == 1


def test_a_static_forward_never_reads_the_device_back(backbone, fleet) -> None:
    memory, keys = fleet
    _, static = _runners(backbone, memory)
    batch, token_ids = _mixed_batch(backbone, keys, 6)
    residents = [memory.get(k) for k in batch.seg_adapter]
    step = static._static_step(batch, residents)
    assert step is not None
    step.load(token_ids, batch.seg_starts, residents)
    mode = _NoWaits()
    with torch.inference_mode(), mode:
        step.run()
    assert mode.seen == []
    with torch.inference_mode(), mode:  # the check can fail: the regular mask does wait
        static._backbone.model(input_ids=step.ids_and_mask[0], attention_mask=step.ids_and_mask[1])
    assert mode.seen


def test_shapes_are_bucketed_and_bounded(backbone, fleet) -> None:
    memory, keys = fleet
    residents = [memory.get(k) for k in keys]  # ranks 8, 4, 16, 0 (head only), 64, 8
    assert bucket(3, ROW_BUCKETS) == 4 and bucket(129, ROW_BUCKETS) is None
    assert shape_of(3, 20, residents[:2], 8192) == Shape(4, 32, 8)
    assert shape_of(3, 20, residents, 8192) == Shape(4, 32, 64)
    assert shape_of(1, 16, [None], 8192) == Shape(1, 16, 8)
    assert shape_of(40, 200, residents[:1], 8192) == Shape(64, 256, 8)  # 8,000 real: fits
    assert shape_of(64, 200, residents[:1], 8192) is None  # 12,800 padded tokens > 8192
    assert shape_of(3, 100, residents[:1], 8192, max_width=110) == Shape(4, 110, 8)
    assert shape_of(1, 600, residents[:1], 8192) is None  # past the longest token bucket


def test_cuda_graphs_are_on_with_cuda_refused_off_it_and_reach_the_runner_from_the_cli() -> None:
    from engine import EngineConfig
    from server.cli import _parser, engine_config

    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        EngineConfig(cuda_graphs=True)
    assert EngineConfig(device="cuda").uses_cuda_graphs  # the default where steps are host-bound
    assert not EngineConfig().uses_cuda_graphs
    assert not EngineConfig(device="cuda", cuda_graphs=False).uses_cuda_graphs
    parse = _parser().parse_args
    assert engine_config(parse(["serve", "--device", "cuda"])).uses_cuda_graphs
    assert engine_config(parse(["serve", "--device", "cuda", "--cuda-graphs"])).cuda_graphs
    off = engine_config(parse(["serve", "--device", "cuda", "--no-cuda-graphs"]))
    assert not off.uses_cuda_graphs


class _FakeCuda:
    """torch.cuda's capture API stood in for on the CPU: a graph records the forward run under
    capture and reruns it on replay; every call must fit the real API's signature."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> None:
        import contextlib
        import inspect

        real = torch.cuda
        self.calls: list[str] = []
        self.forward = None
        calls = self.calls
        fake = self

        class FakeStream:
            def __init__(self, *args, **kwargs) -> None:
                inspect.signature(real.Stream).bind(*args, **kwargs)

            def wait_stream(self, other) -> None:
                calls.append("wait")

        class FakeGraph:
            def capture_begin(self, *args, **kwargs) -> None:
                inspect.signature(real.CUDAGraph.capture_begin).bind(self, *args, **kwargs)
                calls.append("capture")
                self.forward = fake.forward

            def capture_end(self) -> None:
                calls.append("end")

            def replay(self) -> None:
                calls.append("replay")
                self.forward()

        @contextlib.contextmanager
        def fake_stream(stream):
            calls.append("side stream")
            yield

        def no_graph(*args, **kwargs):  # it empties the caching allocators: never used
            raise AssertionError("torch.cuda.graph called")

        monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())
        monkeypatch.setattr(torch.cuda, "stream", fake_stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(torch.cuda, "graph", no_graph)
        if fail:

            def failing_begin(self, *args, **kwargs):
                raise RuntimeError("operation not permitted when stream is capturing")

            monkeypatch.setattr(FakeGraph, "capture_begin", failing_begin)


def test_a_captured_step_warms_up_captures_once_and_replays(
    backbone, fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _FakeCuda(monkeypatch)
    memory, keys = fleet
    regular, static = _runners(backbone, memory)
    batch, token_ids = _mixed_batch(backbone, keys, 6)
    step = static._static_step(batch, [memory.get(k) for k in batch.seg_adapter])
    assert step is not None
    step._capture = True  # as a runner on CUDA with cuda_graphs makes it
    fake.forward = step._forward
    with torch.inference_mode():
        for rows in (6, 7):
            batch, token_ids = _mixed_batch(backbone, keys, rows)
            assert_rows_close(static.step(batch, token_ids), regular.step(batch, token_ids))
    assert fake.calls == ["wait", "side stream", "capture", "end", "wait", "replay", "replay"]
    assert static.num_captures == 1 and static.capture_seconds > 0


def test_shapes_are_captured_up_front_for_the_ranks_given(
    backbone, fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start-up captures every shape of the given ranks, so no step waits on a capture; a
    step of such a shape then replays, and no shape passes the backbone's position limit."""
    from engine.static_step import RANK_BUCKETS, shapes_for

    fake = _FakeCuda(monkeypatch)
    memory, keys = fleet
    regular, static = _runners(backbone, memory)
    static._cuda_graphs = True
    monkeypatch.setattr(static, "_static_max_tokens", 256)  # a few shapes, for speed
    monkeypatch.setattr(backbone, "max_tokens", 48)
    shapes = shapes_for([4, 8, 3], 256, backbone.max_tokens)
    assert {s.rank for s in shapes} == {RANK_BUCKETS[0]}  # ranks 3..8 share the 8 bucket
    assert {s.tokens for s in shapes} == {16, 32, 48}
    assert Shape(128, 16, 8) in shapes and Shape(128, 32, 8) not in shapes  # 65 x 17 > 256
    for rows in range(1, 129):  # every step of the budget finds its shape captured
        for tokens in range(1, 49):
            shape = shape_of(rows, tokens, [None], 256, backbone.max_tokens)
            assert (shape in shapes) == (rows * tokens <= 256)
    fake.forward = lambda: None
    assert static.capture_static([8]) == len(shapes) == static.num_captures
    assert set(static._static) == set(shapes)
    fake.calls.clear()
    batch, token_ids = _mixed_batch(backbone, keys[:1], 5)  # a rank of the 8 bucket
    step = static._static_step(batch, [memory.get(k) for k in batch.seg_adapter])
    assert step is not None and step.shape in shapes
    step._graph.forward = step._forward
    assert_rows_close(static.step(batch, token_ids), regular.step(batch, token_ids))
    assert fake.calls == ["replay"] and static.num_captures == len(shapes)


def test_an_encoder_that_takes_no_4d_mask_never_runs_static(
    backbone, fleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from engine.static_step import static_steps_work

    memory, keys = fleet
    assert static_steps_work(backbone, "cpu", torch.float32)
    model = backbone.model

    def two_d_only(*, input_ids, attention_mask, **kwargs):
        if attention_mask.dim() != 2:
            raise ValueError("attention_mask must be [batch, tokens]")
        return model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(backbone, "model", two_d_only)
    assert not static_steps_work(backbone, "cpu", torch.float32)
    with caplog.at_level("WARNING"):
        _, static = _runners(backbone, memory)
    assert "static steps (CUDA graphs) are off" in caplog.text
    batch, token_ids = _mixed_batch(backbone, keys, 3)
    static.step(batch, token_ids)  # the regular way, and right
    assert static.num_static_steps == 0


def test_a_failed_capture_turns_static_steps_off_and_the_step_still_answers(
    backbone, fleet, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A capture can fail on a GPU (an encoder that reads the device back mid-forward): the
    step falls back to the regular path, and no later step tries to capture again."""
    _FakeCuda(monkeypatch, fail=True)
    memory, keys = fleet
    regular, static = _runners(backbone, memory)
    static._cuda_graphs = True  # as on CUDA: new static steps are to be captured
    batch, token_ids = _mixed_batch(backbone, keys, 5)
    with caplog.at_level("ERROR"):
        got = static.step(batch, token_ids)
    assert "CUDA graph capture failed" in caplog.text
    assert_rows_close(got, regular.step(batch, token_ids))
    assert static.num_static_steps == 0 and static._static_step(batch, []) is None
    static.step(batch, token_ids)  # no second capture, no second error
    assert caplog.text.count("CUDA graph capture failed") == 1


def test_the_model_thread_runs_on_the_configured_cuda_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine.stack import use_device

    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    use_device("cuda:1")  # graphs captured and replayed on cuda:1, not on cuda:0
    use_device("cuda")  # the current device, whatever it is
    assert chosen == [1]
