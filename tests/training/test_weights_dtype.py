"""Trained weights stored as float16: half the bytes, the same answers within rounding."""

import json
import logging
from pathlib import Path

import pytest
import torch

from engine import Engine, EngineConfig
from engine.peft_io import WEIGHTS_FILE
from registry.formats import safetensors_header
from server.train_upload import parse_options
from training import TrainConfig, load_sms_spam, stratified_sample, train_adapter
from training.recipe import Fitted, round_for_storage
from training.trainer import _write_weights


def _stored_dtypes(directory: Path) -> set[str]:
    header, _ = safetensors_header(WEIGHTS_FILE, (directory / WEIGHTS_FILE).read_bytes())
    return {entry["dtype"] for entry in header.values()}


async def test_float16_halves_the_file_and_serves_what_float32_serves(backbone, registry) -> None:
    sample = stratified_sample(load_sms_spam(), 160, seed=2)
    records = {}
    for dtype in ("float16", "float32"):
        config = TrainConfig(epochs=1, seed=5, weights_dtype=dtype)
        result = train_adapter(backbone, registry, "acme", dtype, sample, config, progress=False)
        records[dtype] = result.record
    assert _stored_dtypes(records["float16"].path) == {"F16"}
    assert _stored_dtypes(records["float32"].path) == {"F32"}
    sizes = {d: r.manifest["adapter_bytes"] for d, r in records.items()}
    assert sizes["float16"] < 0.52 * sizes["float32"]
    held_out = [
        json.loads(line)["text"] for line in (records["float32"].path / "eval.jsonl").open()
    ]
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        served = {d: await engine.classify("acme", d, held_out) for d in records}
    assert [p.label for p in served["float16"]] == [p.label for p in served["float32"]]
    gap = max(
        abs(a - b)
        for p16, p32 in zip(served["float16"], served["float32"], strict=True)
        for a, b in zip(p16.scores.values(), p32.scores.values(), strict=True)
    )
    assert 0 < gap < 1e-3  # rounded, so not identical; far below any decision margin


def _fitted(head_scale: float) -> Fitted:
    head = torch.nn.Linear(4, 2)
    with torch.no_grad():
        head.weight.fill_(head_scale)
    factors = {"encoder.layer.0.attention.self.query": (torch.ones(8, 384), torch.ones(384, 8))}
    return Fitted(head=head, predictions=[], epochs_run=1, factors=factors)


def test_a_weight_past_float16s_range_keeps_the_version_float32(
    backbone, tmp_path: Path, caplog
) -> None:
    config = TrainConfig()
    assert _write_weights(tmp_path / "small", backbone, _fitted(0.5), 8, config) is None
    assert _stored_dtypes(tmp_path / "small") == {"F16"}
    with caplog.at_level(logging.WARNING, logger="training.trainer"):
        warning = _write_weights(tmp_path / "big", backbone, _fitted(1e5), 8, config)
    assert _stored_dtypes(tmp_path / "big") == {"F32"}
    # the manifest's warnings carry it (_publish), not only the log
    assert warning == (
        "weights stored as float32, not float16: "
        "base_model.model.classifier.weight holds values too large for torch.float16"
    )
    assert warning in caplog.text
    float32 = TrainConfig(weights_dtype="float32")
    assert _write_weights(tmp_path / "asked", backbone, _fitted(0.5), 8, float32) is None
    assert _stored_dtypes(tmp_path / "asked") == {"F32"}


def test_the_dtype_is_checked_and_reaches_http_jobs() -> None:
    with pytest.raises(ValueError, match="weights_dtype must be one of float16, float32"):
        TrainConfig(weights_dtype="bfloat16")
    assert parse_options({"name": "x"}).config.weights_dtype == "float16"
    assert (
        parse_options({"name": "x", "weights_dtype": "float32"}).config.weights_dtype == "float32"
    )


def test_weights_are_rounded_as_stored_before_the_held_out_evaluation() -> None:
    """All or none: the metrics must describe what is stored, float16 or float32 whole."""
    fine = [torch.tensor([0.1, 1 / 3]), torch.nn.Parameter(torch.tensor([2 / 3]))]
    round_for_storage(fine, TrainConfig())
    assert all(torch.equal(t, t.half().float()) for t in fine)
    assert not torch.equal(fine[0], torch.tensor([0.1, 1 / 3]))  # rounded, not left as it was
    mixed = [torch.tensor([0.1]), torch.tensor([1e5])]
    round_for_storage(mixed, TrainConfig())
    assert torch.equal(mixed[0], torch.tensor([0.1]))  # one overflows: none is rounded
    kept = [torch.tensor([0.1])]
    round_for_storage(kept, TrainConfig(weights_dtype="float32"))
    assert torch.equal(kept[0], torch.tensor([0.1]))
