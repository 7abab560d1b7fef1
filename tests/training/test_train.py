"""Training on a small real sample: it learns, registers, and serves what it measured."""

import json

import pytest
import torch

from engine import Engine, EngineConfig
from registry import NotFound
from training import (
    DataError,
    Example,
    TrainConfig,
    TrainingDiverged,
    load_sms_spam,
    stratified_sample,
    train_adapter,
)
from training.lora_model import select_targets
from training.recipe import Fitted, check_finite


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


@pytest.mark.parametrize("mode", ["head", "lora"])
def test_a_diverging_run_stops_and_publishes_nothing(backbone, registry, sms_sample, mode) -> None:
    """Learning rates far too high make the loss NaN; published, such weights would answer
    null scores under an arbitrary label, so the run fails saying what to change."""
    config = TrainConfig(mode=mode, epochs=1, head_epochs=3, lora_lr=1e6, head_lr=1e6)
    sample = sms_sample[:120]
    with pytest.raises(TrainingDiverged, match=r"the loss is nan at epoch \d+, step \d+; lower"):
        train_adapter(backbone, registry, "acme", "boom", sample, config, progress=False)
    assert [a.name for a in registry.list_adapters("acme")] == []


@pytest.mark.parametrize("mode", ["head", "lora"])
def test_an_update_past_a_floats_range_is_divergence_too(
    backbone, registry, sms_sample, mode
) -> None:
    """At 1e38 Adam's own update overflows inside torch, before any loss is NaN."""
    config = TrainConfig(mode=mode, epochs=1, head_epochs=3, lora_lr=1e38, head_lr=1e38)
    with pytest.raises(TrainingDiverged, match="training diverged: .*; lower the learning"):
        train_adapter(backbone, registry, "acme", "boom", sms_sample[:60], config, progress=False)
    assert registry.list_adapters("acme") == []


def test_weights_that_overflowed_after_the_last_loss_are_refused() -> None:
    head = torch.nn.Linear(4, 2)
    a, b = torch.zeros(8, 4), torch.zeros(4, 8)
    check_finite(Fitted(head=head, predictions=[], epochs_run=1, factors={"q": (a, b)}))
    b[1, 2] = float("inf")
    fitted = Fitted(head=head, predictions=[], epochs_run=1, factors={"q": (a, b)})
    with pytest.raises(TrainingDiverged, match="q's LoRA B holds NaN or infinity"):
        check_finite(fitted)


def test_a_max_length_past_the_backbones_is_refused_before_training(
    backbone, registry, sms_sample
) -> None:
    config = TrainConfig(max_length=backbone.max_tokens + 1)
    with pytest.raises(ValueError, match=f"max_length must be at most {backbone.max_tokens}"):
        train_adapter(backbone, registry, "acme", "m", sms_sample, config, progress=False)


def test_a_target_that_names_no_linear_is_refused_not_skipped(
    backbone, registry, sms_sample
) -> None:
    config = TrainConfig(epochs=1, targets=("query", "vlaue"))
    with pytest.raises(ValueError, match="no linear layer of the backbone matches target 'vlaue'"):
        train_adapter(backbone, registry, "acme", "m", sms_sample[:60], config, progress=False)
    assert registry.list_adapters("acme") == []


def test_lora_never_targets_the_pooler_which_mean_pooling_never_reads(backbone) -> None:
    for suffixes in [(), ("dense",)]:
        chosen = select_targets(backbone, suffixes)
        assert chosen and not any(name.startswith("pooler") for name in chosen), chosen
    assert "encoder.layer.0.output.dense" in select_targets(backbone, ("dense",))


def test_unknown_tenant_and_bad_name_fail_fast(backbone, registry, sms_sample) -> None:
    with pytest.raises(NotFound, match="graft tenants create"):
        train_adapter(backbone, registry, "nobody", "m", sms_sample, TrainConfig(), progress=False)
    with pytest.raises(ValueError, match="adapter"):
        train_adapter(backbone, registry, "acme", "../m", sms_sample, TrainConfig(), progress=False)


def test_bad_config_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="rank"):
        TrainConfig(rank=0)
    for short in (1, 2):  # the tokenizer cuts nothing under 3: whole texts would train
        with pytest.raises(ValueError, match="max_length must be >= 3"):
            TrainConfig(max_length=short)
    for field in ("lora_lr", "head_lr", "backbone_lr", "alpha"):
        for bad in (0.0, float("nan"), float("inf")):  # nan and inf trained into NaN weights
            with pytest.raises(ValueError, match=f"{field} must be > 0 and finite"):
                TrainConfig(**{field: bad})
    with pytest.raises(ValueError, match="weight_decay"):
        TrainConfig(weight_decay=float("nan"))
    with pytest.raises(ValueError, match="warmup_fraction"):
        TrainConfig(warmup_fraction=1.0)
    with pytest.raises(ValueError, match="eval_fraction"):
        TrainConfig(eval_fraction=0.9)
