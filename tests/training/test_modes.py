"""The three training modes: head is served as measured, full leaves the backbone alone."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import Engine, EngineConfig
from registry import Registry
from training import (
    Example,
    TrainConfig,
    classification_metrics,
    clean_examples,
    load_full_model,
    load_sms_spam,
    stratified_sample,
    train_adapter,
)
from training.recipe import split_examples

MAX_LENGTH = 32
HEAD = dict(mode="head", max_length=MAX_LENGTH, head_epochs=30, head_patience=5)


@pytest.fixture(scope="module")
def sms() -> list[Example]:
    return stratified_sample(clean_examples(load_sms_spam()), 200, seed=2)


async def _serve(registry: Registry, name: str, texts: list[str]) -> tuple[list[str], int]:
    """Labels the engine gives ``texts`` as it serves by default (up to the backbone's limit,
    not training's MAX_LENGTH), and the adapter pool pages the model took."""
    config = EngineConfig(registry_dir=registry.root)
    async with Engine(config) as engine:
        free_before = engine.stats()["adapter_pages_free"]
        preds = await engine.classify("acme", name, texts)
        pages_taken = free_before - engine.stats()["adapter_pages_free"]
    return [p.label for p in preds], pages_taken


async def test_held_out_texts_longer_than_max_length_are_measured_as_served(
    backbone, registry, sms
) -> None:
    """Training cuts texts at max_length, the engine does not: the recorded metrics must be
    what the engine answers for the whole text."""
    benign = "see you at lunch tomorrow, I will bring the notes from class. " * 3
    pushy = "WIN a FREE prize now, txt CLAIM to 80082, cash award guaranteed! " * 12
    longer = [Example(f"{row}: {benign} {pushy}", "spam", row) for row in range(4)]
    longer += [Example(f"{row}: {pushy[:60]} {benign * 8}", "ham", row) for row in range(4, 8)]
    config = TrainConfig(**HEAD)
    result = train_adapter(
        backbone, registry, "acme", "long", sms, config, test_examples=longer, progress=False
    )
    texts, gold = [e.text for e in longer], [e.label for e in longer]
    served, _ = await _serve(registry, "long", texts)
    assert classification_metrics(gold, served, result.record.labels) == result.metrics
    cut = EngineConfig(registry_dir=registry.root, max_input_tokens=MAX_LENGTH)
    async with Engine(cut) as engine:
        cut_labels = [p.label for p in await engine.classify("acme", "long", texts)]
    assert cut_labels != served  # the texts do tell the two lengths apart


async def test_head_mode_publishes_rank_0_served_as_measured(backbone, registry, sms) -> None:
    result = train_adapter(
        backbone, registry, "acme", "spam", sms, TrainConfig(**HEAD), progress=False
    )
    record = result.record
    assert result.mode == "head" and result.model_dir is None
    assert record.rank == 0 and record.manifest["rank"] == 0
    assert record.manifest["mode"] == "head" and record.manifest["target_modules"] == []
    tensors = load_file(str(record.path / "adapter_model.safetensors"))
    assert sorted(tensors) == [
        "base_model.model.classifier.bias",
        "base_model.model.classifier.weight",
    ]
    assert result.metrics["macro_f1"] > 0.75  # a majority-class guess scores about 0.46
    held_out = [json.loads(line) for line in (record.path / "eval.jsonl").open()]
    served, pages_taken = await _serve(registry, "spam", [r["text"] for r in held_out])
    gold = [r["label"] for r in held_out]
    assert classification_metrics(gold, served, record.labels) == result.metrics
    assert pages_taken == 0
    assert record.manifest["training"]["eval_max_tokens"] == backbone.max_tokens
    assert (
        sum(
            len(backbone.tokenizer(t)["input_ids"]) > MAX_LENGTH
            for t in [r["text"] for r in held_out]
        )
        >= 3
    )


def test_head_mode_is_reproducible_for_a_seed(backbone, registry, sms) -> None:
    config = TrainConfig(**HEAD, seed=5)
    first = train_adapter(backbone, registry, "acme", "a", sms, config, progress=False)
    second = train_adapter(backbone, registry, "acme", "b", sms, config, progress=False)
    assert first.metrics == second.metrics and first.epochs_run == second.epochs_run
    heads = [load_file(str(r.record.path / "adapter_model.safetensors")) for r in (first, second)]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])


def test_fixed_test_set_is_the_held_out_set(backbone, registry, sms) -> None:
    test = sms[:60]
    train = sms[40:] + [Example(text=test[0].text.upper(), label=test[0].label, row=999)]
    result = train_adapter(
        backbone,
        registry,
        "acme",
        "fixed",
        train,
        TrainConfig(**HEAD),
        progress=False,
        test_examples=test,
    )
    held_out = [json.loads(line) for line in (result.record.path / "eval.jsonl").open()]
    assert [r["text"] for r in held_out] == [e.text for e in test]
    assert result.metrics["num_examples"] == len(test)
    training = result.record.manifest["training"]
    assert training["fixed_test_set"] is True
    # the 20 overlapping rows and the upper-cased copy of a test text never reach training
    assert training["train_examples"] + training["val_examples"] == len(sms) - 60


def test_full_mode_writes_a_directory_and_leaves_the_backbone_alone(
    backbone, sms, tmp_path: Path
) -> None:
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    out = tmp_path / "full"
    test, train = sms[:30], sms[30:90]
    config = TrainConfig(mode="full", epochs=1, max_length=MAX_LENGTH)
    result = train_adapter(
        backbone,
        None,
        "acme",
        "Spam Full",  # registers nothing, so any name: the directory's, say
        train,
        config,
        progress=False,
        test_examples=test,
        output_dir=out,
    )
    assert result.mode == "full" and result.record is None and result.model_dir == out
    after = backbone.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert backbone.lora_state.plan is None
    meta = json.loads((out / "graft_model.json").read_text())
    assert meta["mode"] == "full" and meta["labels"] == ["ham", "spam"]
    assert result.adapter_bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    model = load_full_model(out)
    assert not any(".base." in k for k in model.model.encoder.state_dict())
    predicted = model.predict([e.text for e in test])
    assert (
        classification_metrics([e.label for e in test], predicted, model.labels) == result.metrics
    )


def test_modes_are_validated_before_any_work(
    backbone, registry, sms, tmp_path: Path, monkeypatch
) -> None:
    with pytest.raises(ValueError, match="mode must be one of head, lora, full"):
        TrainConfig(mode="merged")
    with pytest.raises(ValueError, match="output_dir"):
        train_adapter(backbone, registry, "acme", "m", sms, TrainConfig(mode="full"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(ValueError, match="not an empty directory"):
        train_adapter(backbone, None, "acme", "m", sms, TrainConfig(mode="full"), output_dir=busy)
    under_a_file = busy / "x" / "model"  # found only when it is created, after training
    with pytest.raises(ValueError, match=r"cannot be created, .*busy/x is not a directory"):
        train_adapter(
            backbone, None, "acme", "m", sms, TrainConfig(mode="full"), output_dir=under_a_file
        )
    empty_here = tmp_path / "here"
    empty_here.mkdir()
    monkeypatch.chdir(empty_here)  # empty, but replacing it would pull the cwd from under us
    for here in (Path("."), empty_here, tmp_path):
        with pytest.raises(ValueError, match="is the current directory or holds it"):
            train_adapter(
                backbone, None, "acme", "m", sms, TrainConfig(mode="full"), output_dir=here
            )
    with pytest.raises(ValueError, match="registry"):
        train_adapter(backbone, None, "acme", "m", sms, TrainConfig(mode="head"))
    with pytest.raises(ValueError, match="head_epochs"):
        TrainConfig(head_epochs=0)
    with pytest.raises(ValueError, match="epochs must be at most 1,000, got 99999999999999999999"):
        TrainConfig(epochs=99999999999999999999)
    with pytest.raises(ValueError, match=r"got 999999999999999999999999999\.\.\.$"):
        TrainConfig(epochs=int("9" * 1000))  # the message does not echo 1,000 digits
    with pytest.raises(ValueError, match="batch_size must be at most 4,096"):
        TrainConfig(batch_size=10**6)
    assert registry.list_adapters("acme") == []


def test_split_deduplicates_before_splitting_and_checks_test_labels() -> None:
    rows = [Example(text=f"text number {i % 30}", label="ab"[i % 2], row=i + 1) for i in range(60)]
    split = split_examples(rows, TrainConfig(seed=1))
    sides = [{e.text for e in side} for side in (split.train, split.val, split.held_out)]
    assert sum(map(len, sides)) == 30 and not (sides[0] & sides[1] or sides[0] & sides[2])
    assert split == split_examples(rows, TrainConfig(seed=1))  # a seed fixes the split
    unseen = [Example(text="brand new", label="c", row=1)]
    with pytest.raises(ValueError, match="'c'"):
        split_examples(rows, TrainConfig(), test_examples=unseen)


def test_a_sample_too_small_to_split_is_named() -> None:
    rows = [Example(text=f"text {i}", label=f"class{i % 10}", row=i + 1) for i in range(50)]
    with pytest.raises(ValueError, match=r"too few rows to split \(max_examples=12"):
        split_examples(rows, TrainConfig(max_examples=12))
