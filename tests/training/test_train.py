"""Training on a small real sample: it learns, registers, and serves what it measured."""

import json

import pytest

from engine import Engine, EngineConfig
from registry import NotFound
from training import (
    DataError,
    Example,
    TrainConfig,
    load_sms_spam,
    stratified_sample,
    train_adapter,
)


@pytest.fixture(scope="module")
def sms_sample() -> list[Example]:
    return stratified_sample(load_sms_spam(), 240, seed=1)


async def test_train_register_and_serve_the_same_scores(backbone, registry, sms_sample) -> None:
    config = TrainConfig(epochs=2, max_length=128, batch_size=16, seed=3)
    result = train_adapter(backbone, registry, "acme", "spam", sms_sample, config, progress=False)
    record = result.record
    assert (record.full_name, record.version) == ("acme/spam", 1)
    assert record.labels == ("ham", "spam")
    assert record.manifest["pooling"] == "mean"
    assert record.manifest["mode"] == "lora" and record.rank == 8
    assert result.mode == "lora" and result.model_dir is None
    assert record.manifest["data"]["num_rows"] == len(sms_sample)
    assert result.adapter_bytes == (record.path / "adapter_model.safetensors").stat().st_size
    assert result.metrics["macro_f1"] > 0.75  # a majority-class guess scores about 0.46
    held_out = [json.loads(line) for line in (record.path / "eval.jsonl").open()]
    train_texts = {e.text for e in sms_sample} - {r["text"] for r in held_out}
    assert held_out and not train_texts & {r["text"] for r in held_out}
    async with Engine(EngineConfig(registry_dir=registry.root)) as engine:
        preds = await engine.classify("acme", "spam", [r["text"] for r in held_out])
    served_accuracy = sum(p.label == r["label"] for p, r in zip(preds, held_out, strict=True))
    assert served_accuracy / len(held_out) == pytest.approx(result.metrics["accuracy"], abs=1e-9)


def test_fatal_data_problems_stop_before_training(backbone, registry) -> None:
    one_class = [Example(text=f"text {i}", label="a", row=i + 1) for i in range(20)]
    with pytest.raises(DataError, match="class"):
        train_adapter(backbone, registry, "acme", "m", one_class, TrainConfig(), progress=False)
    tiny = one_class + [Example(text="lonely", label="b", row=21)]
    with pytest.raises(DataError, match="21"):
        train_adapter(backbone, registry, "acme", "m", tiny, TrainConfig(), progress=False)
    assert registry.list_adapters("acme") == []


def test_unknown_tenant_and_bad_name_fail_fast(backbone, registry, sms_sample) -> None:
    with pytest.raises(NotFound, match="graft tenants create"):
        train_adapter(backbone, registry, "nobody", "m", sms_sample, TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="adapter"):
        train_adapter(backbone, registry, "acme", "../m", sms_sample, TrainConfig(), progress=False)


def test_bad_config_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="eval_fraction"):
        TrainConfig(eval_fraction=0.9)
