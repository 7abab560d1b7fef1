"""Encoders other than BERT: DistilBERT, RoBERTa and ELECTRA layouts train, serve and refuse
what they cannot serve. Tiny random-weight models with the packaged tokenizer stand in for
real checkpoints (the hub is offline); only the layout matters here."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, DistilBertConfig, ElectraConfig, RobertaConfig

from engine import AdapterFormatError, Engine, EngineConfig, load_backbone, packaged_backbone_dir
from registry import Registry
from training import (
    TrainConfig,
    classification_metrics,
    clean_examples,
    load_sms_spam,
    stratified_sample,
    train_adapter,
)

MAX_LENGTH = 32
VOCAB = 30522  # the packaged tokenizer's
CONFIGS = {
    "distilbert": lambda: DistilBertConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=2, hidden_dim=128
    ),
    "roberta": lambda: RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=130,
        pad_token_id=0,
    ),
    "electra": lambda: ElectraConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        embedding_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
    ),
}


def _random_encoder(kind: str, out: Path) -> Path:
    torch.manual_seed(0)
    AutoModel.from_config(CONFIGS[kind]()).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        source = packaged_backbone_dir() / name
        if source.is_file():
            shutil.copy(source, out / name)
    return out


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def encoder_dir(request, tmp_path_factory) -> Path:
    return _random_encoder(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def sms():
    return stratified_sample(clean_examples(load_sms_spam()), 120, seed=1)


async def test_lora_on_another_encoder_is_served_as_measured(encoder_dir, sms, tmp_path) -> None:
    backbone = load_backbone(encoder_dir)
    assert backbone.linears and backbone.num_pauses > 0  # LoRA targets and pause points found
    registry = Registry(tmp_path / "registry")
    registry.create_tenant("acme")
    config = TrainConfig(mode="lora", epochs=1, max_length=MAX_LENGTH, rank=4)
    result = train_adapter(backbone, registry, "acme", "spam", sms, config, progress=False)
    record = result.record
    registry.close()
    held_out = [json.loads(line) for line in (record.path / "eval.jsonl").open()]
    texts, gold = [r["text"] for r in held_out], [r["label"] for r in held_out]
    engine_config = EngineConfig(
        registry_dir=tmp_path / "registry", backbone_dir=encoder_dir, max_input_tokens=MAX_LENGTH
    )
    async with Engine(engine_config) as engine:
        together = await engine.classify("acme", "spam", texts)
        alone = [(await engine.classify("acme", "spam", [t]))[0] for t in texts[:4]]
    served = [p.label for p in together]
    assert classification_metrics(gold, served, record.labels) == result.metrics
    for one, batched in zip(alone, together, strict=False):  # a row's neighbours change nothing
        assert one.scores == pytest.approx(batched.scores, abs=1e-5)


def test_a_two_layer_peft_head_is_refused_by_name(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft", reason="peft is a dev dependency")
    from transformers import AutoModelForSequenceClassification

    from engine.peft_io import import_peft

    encoder = _random_encoder("roberta", tmp_path / "roberta")
    base = AutoModelForSequenceClassification.from_pretrained(
        str(encoder), num_labels=2, local_files_only=True
    )
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    peft.get_peft_model(base, config).save_pretrained(str(tmp_path / "adapter"))
    (tmp_path / "adapter" / "labels.txt").write_text("neg\npos\n")
    registry = Registry(tmp_path / "registry")
    registry.create_tenant("acme")
    with pytest.raises(AdapterFormatError, match="head has two layers"):
        import_peft(registry, load_backbone(encoder), "acme", "m", tmp_path / "adapter")
    assert registry.list_adapters("acme") == []  # nothing half-registered
