"""Encoders other than BERT: DistilBERT, RoBERTa and ELECTRA layouts train with graft, import
from PEFT (their two-layer classification heads included) and serve. Tiny random-weight models
with the packaged tokenizer stand in for real checkpoints (the hub is offline); only the
layout matters here."""

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AlbertConfig,
    AutoModel,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    MPNetConfig,
    RobertaConfig,
)

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
# the sizes of every tiny BERT-like layout below (DistilBERT names them its own way)
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
}
CONFIGS = {
    "distilbert": lambda: DistilBertConfig(
        vocab_size=VOCAB, dim=64, n_layers=2, n_heads=2, hidden_dim=128
    ),
    "roberta": lambda: RobertaConfig(**TINY, max_position_embeddings=130, pad_token_id=0),
    "electra": lambda: ElectraConfig(**TINY, embedding_size=32),
}


# layouts with a quirk of their own, each checked by a test below rather than by every test
QUIRKS = {
    # a bare Linear for a pooler, its tanh applied beside it
    "albert": lambda: AlbertConfig(**TINY, embedding_size=32),
    # transformers' ELECTRA head uses gelu whatever hidden_act says
    "electra-relu": lambda: ElectraConfig(**TINY, embedding_size=32, hidden_act="relu"),
    # positions counted from the padding index, as RoBERTa's
    "mpnet": lambda: MPNetConfig(**TINY, max_position_embeddings=130),
    # v3's relative attention; a two-layer head whose first layer (pooler.dense) sits outside
    # the base model, its activation the config's pooler_hidden_act
    "deberta-v2": lambda: DebertaV2Config(
        **TINY,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        max_relative_positions=-1,
        position_buckets=16,
        pooler_hidden_act="tanh",
    ),
}


def _random_encoder(kind: str, out: Path) -> Path:
    torch.manual_seed(0)
    AutoModel.from_config({**CONFIGS, **QUIRKS}[kind]()).save_pretrained(out)
    return _copy_tokenizer(out)


def _copy_tokenizer(out: Path) -> Path:
    """The packaged tokenizer beside a model saved in ``out``."""
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
    # served at the engine's default length, as the held-out metrics were measured
    engine_config = EngineConfig(registry_dir=tmp_path / "registry", backbone_dir=encoder_dir)
    async with Engine(engine_config) as engine:
        together = await engine.classify("acme", "spam", texts)
        alone = [(await engine.classify("acme", "spam", [t]))[0] for t in texts[:4]]
    served = [p.label for p in together]
    assert classification_metrics(gold, served, record.labels) == result.metrics
    for one, batched in zip(alone, together, strict=False):  # a row's neighbours change nothing
        assert one.scores == pytest.approx(batched.scores, abs=1e-5)


TEXTS = [
    "Congratulations! You've been selected for a free cruise. Reply YES.",
    "Can you send me the minutes from Tuesday's meeting?",
    "new phone who dis",
]
# each layout's LoRA targets, by PEFT's module names
TARGETS = {
    "distilbert": ["q_lin", "v_lin"],
    "roberta": ["query", "value"],
    "electra": ["query"],
    "albert": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
}
# what PEFT saves beside the LoRA where its default (the classifier) leaves a layer out
MODULES_TO_SAVE = {"deberta-v2": ["classifier", "pooler"]}


def _peft_adapter(encoder: Path, out: Path, num_labels: int, *, save_whole_head: bool = True):
    """A PEFT SEQ_CLS adapter on ``encoder`` (random LoRA, its two-layer head trained as
    saved) and PEFT's own probabilities for TEXTS."""
    peft = pytest.importorskip("peft", reason="peft is a dev dependency")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(1)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(encoder), num_labels=num_labels, local_files_only=True
    )
    kind = base.config.model_type
    config = peft.LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=TARGETS[kind],
        modules_to_save=MODULES_TO_SAVE.get(kind) if save_whole_head else None,
    )
    model = peft.get_peft_model(base, config).eval()
    model.save_pretrained(str(out))
    (out / "labels.txt").write_text("\n".join(f"l{i}" for i in range(num_labels)))
    tokenizer = AutoTokenizer.from_pretrained(str(encoder), local_files_only=True)
    with torch.no_grad():
        probs = torch.softmax(
            model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits, -1
        )
    return probs


async def test_peft_adapters_with_two_layer_heads_serve_as_peft(encoder_dir, tmp_path) -> None:
    from engine.peft_io import import_peft

    expected = _peft_adapter(encoder_dir, tmp_path / "adapter", num_labels=3)
    backbone = load_backbone(encoder_dir)
    registry = Registry(tmp_path / "registry")
    registry.create_tenant("acme")
    record = import_peft(registry, backbone, "acme", "m", tmp_path / "adapter")
    assert record.manifest["pooling"] == "first"
    assert record.manifest["head_activation"] in ("relu", "tanh", "gelu")
    registry.close()
    config = EngineConfig(registry_dir=tmp_path / "registry", backbone_dir=encoder_dir)
    async with Engine(config) as engine:
        together = await engine.classify("acme", "m", TEXTS)  # padded or packed, one step
        alone = await asyncio.gather(*(engine.classify("acme", "m", [t]) for t in TEXTS))
    got = torch.tensor([[p.scores[f"l{i}"] for i in range(3)] for p in together])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    for one, batched in zip(alone, together, strict=True):
        assert one[0].scores == pytest.approx(batched.scores, abs=1e-5)


async def test_two_layer_and_one_layer_heads_share_a_step(tmp_path, sms) -> None:
    """A RoBERTa-layout engine: a PEFT model (two-layer head on the first token) and a
    graft-trained one (one layer on the mean) answer in the same steps as they do alone."""
    from engine.peft_io import import_peft

    encoder = _random_encoder("roberta", tmp_path / "roberta")
    _peft_adapter(encoder, tmp_path / "adapter", num_labels=2)
    backbone = load_backbone(encoder)
    registry = Registry(tmp_path / "registry")
    registry.create_tenant("acme")
    import_peft(registry, backbone, "acme", "peft", tmp_path / "adapter")
    config = TrainConfig(mode="lora", epochs=1, max_length=MAX_LENGTH, rank=4)
    train_adapter(backbone, registry, "acme", "graft", sms[:60], config, progress=False)
    registry.close()
    engine_config = EngineConfig(registry_dir=tmp_path / "registry", backbone_dir=encoder)
    async with Engine(engine_config) as engine:
        alone = {m: await engine.classify("acme", m, TEXTS) for m in ("peft", "graft")}
        mixed = await asyncio.gather(
            *(engine.classify("acme", m, [t]) for t in TEXTS for m in ("peft", "graft"))
        )
        many = await engine.classify_many("acme", ["peft", "graft"], TEXTS)
    for i, text_answers in enumerate(zip(mixed[0::2], mixed[1::2], strict=True)):
        for m, answer in zip(("peft", "graft"), text_answers, strict=True):
            assert answer[0].scores == pytest.approx(alone[m][i].scores, abs=1e-5)
            assert many[i].results[("peft", "graft").index(m)].scores == pytest.approx(
                alone[m][i].scores, abs=1e-5
            )


async def test_a_two_layer_head_without_lora_serves_on_the_bare_backbone(tmp_path) -> None:
    """Head-only (rank 0): the head runs on the host over the bare backbone's first token."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel, AutoTokenizer

    from engine.peft_io import import_peft

    encoder = _random_encoder("distilbert", tmp_path / "distilbert")
    adapter = tmp_path / "adapter"
    _peft_adapter(encoder, adapter, num_labels=2)
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    head = {k: v for k, v in tensors.items() if "lora_" not in k}
    save_file(head, str(adapter / "adapter_model.safetensors"))
    registry = Registry(tmp_path / "registry")
    registry.create_tenant("acme")
    record = import_peft(registry, load_backbone(encoder), "acme", "m", adapter)
    assert record.rank == 0
    registry.close()
    engine_config = EngineConfig(registry_dir=tmp_path / "registry", backbone_dir=encoder)
    async with Engine(engine_config) as engine:
        got = await engine.classify("acme", "m", TEXTS)  # its head after the step
        many = await engine.classify_many("acme", ["m"], TEXTS)  # on the host, after the step
    for one, multi in zip(got, many, strict=True):
        assert multi.results[0].scores == pytest.approx(one.scores, abs=1e-5)
    model = AutoModel.from_pretrained(str(encoder), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(encoder), local_files_only=True)
    with torch.no_grad():
        first = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
        prefix = "base_model.model."
        hidden = torch.relu(
            torch.nn.functional.linear(
                first,
                head[f"{prefix}pre_classifier.weight"],
                head[f"{prefix}pre_classifier.bias"],
            )
        )
        logits = torch.nn.functional.linear(
            hidden,
            head[f"{prefix}classifier.weight"],
            head[f"{prefix}classifier.bias"],
        )
    expected = torch.softmax(logits, -1)
    served = torch.tensor([[p.scores["l0"], p.scores["l1"]] for p in got])
    torch.testing.assert_close(served, expected, rtol=0, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
async def test_two_layer_heads_on_cuda_graphs_answer_as_on_the_cpu(tmp_path) -> None:
    """Static steps pool the first token into a buffer of their own, inside the graph."""
    from engine.peft_io import import_peft

    encoder = _random_encoder("roberta", tmp_path / "roberta")
    backbone = load_backbone(encoder)
    _two_layer_adapter(backbone, tmp_path / "adapter", num_labels=3)  # no peft on the GPU host
    registry = Registry(tmp_path / "registry")
    registry.create_tenant("acme")
    import_peft(registry, backbone, "acme", "m", tmp_path / "adapter")
    registry.close()
    answers = {}
    for device in ("cpu", "cuda"):
        config = EngineConfig(
            registry_dir=tmp_path / "registry", backbone_dir=encoder, device=device
        )
        async with Engine(config) as engine:
            answers[device] = await asyncio.gather(
                *(engine.classify("acme", "m", [t]) for t in TEXTS)
            )
            static_steps = engine.stats()["static_steps"]
    assert static_steps > 0  # the CUDA answers came from captured steps
    for cpu, cuda in zip(answers["cpu"], answers["cuda"], strict=True):
        assert cuda[0].scores == pytest.approx(cpu[0].scores, abs=1e-4)


def _two_layer_adapter(backbone, out: Path, num_labels: int) -> None:
    """A RoBERTa-style SEQ_CLS adapter written as PEFT lays it out, without PEFT: random LoRA
    on query and value, and a head of classifier.dense and classifier.out_proj."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    hidden, prefix = backbone.hidden_size, "base_model.model."
    tensors = {}
    for name in backbone.linear_names:
        if name.endswith(("query", "value")):
            wrapper = backbone.linears[name]
            key = f"{prefix}{backbone.base_prefix}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(4, wrapper.in_features, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.randn(wrapper.out_features, 4, generator=gen)
    for layer, shape in (("dense", (hidden, hidden)), ("out_proj", (num_labels, hidden))):
        tensors[f"{prefix}classifier.{layer}.weight"] = torch.randn(*shape, generator=gen) * 0.2
        tensors[f"{prefix}classifier.{layer}.bias"] = torch.randn(shape[0], generator=gen) * 0.1
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8}
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "labels.txt").write_text("\n".join(f"l{i}" for i in range(num_labels)))


def test_only_backbones_with_two_layer_heads_pool_the_first_token(encoder_dir, backbone) -> None:
    from engine.adapters import POOLING_FIRST, backbone_poolings, parse_adapter

    assert POOLING_FIRST in backbone_poolings(load_backbone(encoder_dir))
    assert POOLING_FIRST not in backbone_poolings(backbone)  # BERT: nothing reads it there
    config = json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}).encode()
    from safetensors.torch import save

    weights = save(
        {
            "base_model.model.classifier.weight": torch.zeros(2, backbone.hidden_size),
            "base_model.model.classifier.bias": torch.zeros(2),
        }
    )
    with pytest.raises(AdapterFormatError, match="pooling 'first'"):
        parse_adapter(config, weights, ("a", "b"), POOLING_FIRST, backbone)


@pytest.mark.parametrize("kind", ["albert", "electra-relu", "deberta-v2"])
async def test_layout_quirks_serve_as_peft(kind: str, tmp_path) -> None:
    """ALBERT's packed steps failed every row (its pooler is a bare Linear, its tanh beside
    it); an ELECTRA with a relu hidden_act was served with a relu head, where transformers'
    head is gelu whatever the config says. DeBERTa's head was refused: its first layer is
    the model's pooler.dense, outside the base model."""
    from engine.peft_io import import_peft

    encoder = _random_encoder(kind, tmp_path / kind)
    expected = _peft_adapter(encoder, tmp_path / "adapter", num_labels=3)
    registry = Registry(tmp_path / "registry")
    registry.create_tenant("acme")
    record = import_peft(registry, load_backbone(encoder), "acme", "m", tmp_path / "adapter")
    activation = "tanh" if kind == "deberta-v2" else "gelu"
    assert record.manifest.get("head_activation") in (None, activation)
    registry.close()
    config = EngineConfig(registry_dir=tmp_path / "registry", backbone_dir=encoder)
    async with Engine(config) as engine:
        together = await engine.classify("acme", "m", TEXTS)  # rows of several lengths
        # DeBERTa's relative positions fail the packed check: its steps are padded
        assert engine.stats()["packed_steps"] >= (kind != "deberta-v2")
    got = torch.tensor([[p.scores[f"l{i}"] for i in range(3)] for p in together])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


async def test_an_input_at_the_limit_fits_an_encoder_counting_positions_from_padding(
    tmp_path,
) -> None:
    """MPNet's positions start after its padding index, as RoBERTa's: a limit taken as its
    whole position table made an input at the limit fail its step, neighbours' rows too."""
    encoder = _random_encoder("mpnet", tmp_path / "mpnet")
    backbone = load_backbone(encoder)
    assert backbone.max_tokens == 130 - 2
    registry = Registry(tmp_path / "registry")
    registry.create_tenant("acme")
    config = TrainConfig(mode="head", epochs=1, max_length=MAX_LENGTH)
    sms = stratified_sample(clean_examples(load_sms_spam()), 60, seed=2)
    train_adapter(backbone, registry, "acme", "m", sms, config, progress=False)
    registry.close()
    engine_config = EngineConfig(registry_dir=tmp_path / "registry", backbone_dir=encoder)
    async with Engine(engine_config) as engine:
        answers = await engine.classify("acme", "m", ["word " * 400, "short"])
    assert answers[0].truncated and answers[0].num_tokens == 128 and len(answers) == 2


def test_adapters_whose_init_rewrote_the_base_weights_are_refused(tmp_path) -> None:
    """PiSSA, OLoRA and the like subtract the adapter's starting update from the base
    weights, which PEFT redoes at load: served over the shared backbone, they were off."""
    from engine.peft_io import import_peft

    encoder = _random_encoder("roberta", tmp_path / "roberta")
    _peft_adapter(encoder, tmp_path / "adapter", num_labels=2)
    config_file = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    registry = Registry(tmp_path / "registry")
    registry.create_tenant("acme")
    for init in ("pissa", "pissa_niter_4", "olora", "corda", "loftq"):
        config_file.write_text(json.dumps(config | {"init_lora_weights": init}))
        with pytest.raises(AdapterFormatError, match="also rewrites the base model's weights"):
            import_peft(registry, load_backbone(encoder), "acme", "m", tmp_path / "adapter")
    config_file.write_text(json.dumps(config | {"init_lora_weights": "gaussian"}))
    assert import_peft(registry, load_backbone(encoder), "acme", "m", tmp_path / "adapter")
    registry.close()


def test_a_deberta_adapter_saved_without_its_pooler_is_refused_saying_so(tmp_path) -> None:
    """PEFT's default saves the classifier alone; DeBERTa's head needs its pooler.dense too,
    and the refusal said the backbone lacked a [CLS] pooler, which named nothing to do."""
    from engine.peft_io import import_peft

    encoder = _random_encoder("deberta-v2", tmp_path / "deberta")
    _peft_adapter(encoder, tmp_path / "adapter", num_labels=2, save_whole_head=False)
    with Registry(tmp_path / "registry") as registry:
        registry.create_tenant("acme")
        with pytest.raises(AdapterFormatError, match=r"modules_to_save.*'pooler'"):
            import_peft(registry, load_backbone(encoder), "acme", "m", tmp_path / "adapter")
        assert registry.list_adapters("acme") == []
