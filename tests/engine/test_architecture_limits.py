"""Encoders graft cannot serve as it serves BERT, and what it does about each: refused by
name at start, served without the step shapes they break, or refused at training. Tiny
random-weight models with the packaged tokenizer stand in for real checkpoints."""

import pytest
import torch
from transformers import (
    AutoModel,
    ConvBertConfig,
    FNetConfig,
    FunnelConfig,
    FunnelModel,
    LongformerConfig,
    SqueezeBertConfig,
)

from engine import Engine, EngineConfig, load_backbone
from registry import Registry
from tests.engine.test_architectures import TINY, VOCAB, _copy_tokenizer
from training import TrainConfig, clean_examples, load_sms_spam, stratified_sample, train_adapter

# models whose hidden states for a text change with the padding beside it
PADDING_MIXERS = {
    "fnet": lambda: FNetConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, intermediate_size=128
    ),
    "funnel": lambda: FunnelConfig(
        vocab_size=VOCAB, block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128
    ),
    "convbert": lambda: ConvBertConfig(**TINY, embedding_size=64),
}


def _save(config, out):
    torch.manual_seed(0)
    model = (
        FunnelModel(config) if isinstance(config, FunnelConfig) else AutoModel.from_config(config)
    )
    model.save_pretrained(out)
    return _copy_tokenizer(out)


@pytest.mark.parametrize("kind", sorted(PADDING_MIXERS))
async def test_a_model_that_mixes_padding_into_texts_is_refused_at_start(kind, tmp_path) -> None:
    """FNet's answer for a text flipped from spam to ham when another tenant's longer text
    shared its step: each row must be what it is alone."""
    model_dir = _save(PADDING_MIXERS[kind](), tmp_path / kind)
    config = EngineConfig(registry_dir=tmp_path / "registry", backbone_dir=model_dir)
    with pytest.raises(ValueError, match=rf"\({kind}\) answers a text differently when it is pad"):
        async with Engine(config):
            pass


async def test_longformer_serves_unpacked(tmp_path) -> None:
    """Its forward raised IndexError on the packed check's 4-D mask, which the check did not
    catch: the engine's start failed with a bare traceback."""
    config = LongformerConfig(
        **TINY, attention_window=[8, 8], max_position_embeddings=130, pad_token_id=0
    )
    model_dir = _save(config, tmp_path / "longformer")
    with Registry(tmp_path / "registry") as registry:
        registry.create_tenant("acme")
    engine_config = EngineConfig(registry_dir=tmp_path / "registry", backbone_dir=model_dir)
    async with Engine(engine_config) as engine:
        assert engine._loaded.runner.pack_max_tokens == 0  # not packed: its check said no
        assert engine.stats()["steps"] == 0


def test_lora_on_a_backbone_without_linears_is_refused(tmp_path) -> None:
    """SqueezeBERT's layers are Conv1d: a "lora" job trained no factor and registered a bare
    head as a LoRA model, without a word."""
    config = SqueezeBertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        embedding_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    backbone = load_backbone(_save(config, tmp_path / "squeezebert"))
    examples = stratified_sample(clean_examples(load_sms_spam()), 40, seed=1)
    with Registry(tmp_path / "registry") as registry:
        registry.create_tenant("acme")
        with pytest.raises(ValueError, match="no Linear layer for LoRA to target.*mode head"):
            train_adapter(
                backbone,
                registry,
                "acme",
                "spam",
                examples,
                TrainConfig(epochs=1, max_length=32),
                progress=False,
            )
        assert registry.list_adapters("acme") == []
