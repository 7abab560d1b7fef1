"""Adapters trained with Hugging Face PEFT serve exactly as PEFT itself predicts them."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft", reason="peft is a dev dependency: pip install -e '.[dev]'")

from engine import AdapterFormatError, Engine, EngineConfig  # noqa: E402
from engine.peft_io import import_peft  # noqa: E402
from registry import Registry  # noqa: E402

TEXTS = [
    "Congratulations! You've been selected for a free cruise. Reply YES.",
    "Can you send me the minutes from Tuesday's meeting?",
    "The striker scored twice as the home side came back to win 3-2.",
    "new phone who dis",
]

CONFIGS = {
    "qv-r8": dict(r=8, lora_alpha=16, target_modules=["query", "value"]),
    "dense-r4-pooler": dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"]),
    "all-r16-rslora": dict(
        r=16, lora_alpha=32, use_rslora=True, target_modules=["query", "key", "value", "dense"]
    ),
    "patterns": dict(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        rank_pattern={"value": 4},
        alpha_pattern={"value": 32},
    ),
    # keys as PEFT names them (with the "bert." prefix) and as regexes; the first match wins
    "patterns-full-keys": dict(
        r=8,
        lora_alpha=16,
        target_modules=["query", "value"],
        rank_pattern={"bert.encoder.layer.1.attention.self.value": 2, r"layer\.[0-2]\..*value": 4},
        alpha_pattern={
            r"encoder\.layer\.[0-2]\.attention\.self\.query": 64,
            "bert.encoder.layer.1.attention.self.value": 48,
            "value": 8,  # every value but layer 1's, which the entry before names first
        },
    ),
    # PEFT saves factors only for the modules these select: import must accept the rest absent
    "some-layers": dict(
        r=4, lora_alpha=8, target_modules=["query", "value"], layers_to_transform=[0, 2]
    ),
    "regex-targets": dict(r=4, lora_alpha=8, target_modules=r".*\.layer\.[13]\..*\.(key|query)"),
}


def _make_peft_adapter(backbone, out: Path, name: str, num_labels: int, seed: int):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(
        str(backbone.path), num_labels=num_labels, local_files_only=True
    )
    config = peft.LoraConfig(task_type="SEQ_CLS", init_lora_weights=False, **CONFIGS[name])
    model = peft.get_peft_model(base, config)
    model.save_pretrained(str(out))
    labels = [f"label{i}" for i in range(num_labels)]
    (out / "labels.txt").write_text("\n".join(labels))
    model.eval()
    enc = backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits, dim=-1)
    return labels, probs


@pytest.fixture(scope="module")
def peft_adapters(backbone, tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    made = {}
    for i, name in enumerate(CONFIGS):
        out = root / name
        made[name] = (out, *_make_peft_adapter(backbone, out, name, num_labels=2 + i, seed=i))
    return made


async def test_served_predictions_equal_peft(backbone, peft_adapters, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    registry.create_tenant("acme")
    for name, (path, _, _) in peft_adapters.items():
        record = import_peft(registry, backbone, "acme", name, path)
        assert record.manifest["pooling"] == "cls_pooler"
    registry.close()
    async with Engine(EngineConfig(registry_dir=tmp_path / "reg")) as engine:
        for name, (_, labels, expected) in peft_adapters.items():
            preds = await engine.classify("acme", name, TEXTS)
            got = torch.tensor([[p.scores[label] for label in labels] for p in preds])
            torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-4)


def test_import_refuses_bad_directories(backbone, peft_adapters, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "reg")
    registry.create_tenant("acme")
    src, labels, _ = peft_adapters["qv-r8"]
    with pytest.raises(AdapterFormatError, match="missing adapter_config.json"):
        import_peft(registry, backbone, "acme", "empty", tmp_path)
    bad = tmp_path / "wrong-labels"
    bad.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (bad / f).write_bytes((src / f).read_bytes())
    with pytest.raises(AdapterFormatError, match="classifier.weight"):
        import_peft(registry, backbone, "acme", "bad", bad, labels=["only", "three", "labels"])
    config = json.loads((bad / "adapter_config.json").read_text())
    config["use_dora"] = True
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFormatError, match="DoRA"):
        import_peft(registry, backbone, "acme", "bad", bad, labels=labels)
    # JSON that parses to the wrong thing is named, not an AttributeError from deep inside
    for text, match in [("[1, 2]", "must hold a JSON object"), ("[" * 3000, "is not valid JSON")]:
        (bad / "adapter_config.json").write_text(text)
        with pytest.raises(AdapterFormatError, match=f"adapter_config.json {match}"):
            import_peft(registry, backbone, "acme", "bad", bad, labels=labels)
    config["use_dora"] = False
    cases = [
        (
            {**config, "r": 16},
            "says r=16 for encoder.layer.0.attention.self.query, but its weights have rank 8",
        ),
        ({**config, "lora_alpha": "16"}, "lora_alpha for .* must be a number"),
        ({**config, "lora_alpha": float("inf")}, "lora_alpha for .* is inf, a LoRA scale of inf"),
        ({**config, "lora_alpha": float("nan")}, "lora_alpha for .* is nan, a LoRA scale of nan"),
        # finite, but its scale (alpha / r) past float32: it would fail every row of its step
        ({**config, "lora_alpha": 1e308}, "a LoRA scale of 1.25e\\+307; a scale must be finite"),
        ({**config, "rank_pattern": {"(": 4}}, "rank_pattern key '\\(' is not a valid pattern"),
    ]
    for bad_config, match in cases:
        (bad / "adapter_config.json").write_text(json.dumps(bad_config))
        with pytest.raises(AdapterFormatError, match=match):
            import_peft(registry, backbone, "acme", "bad", bad, labels=labels)
    (bad / "adapter_config.json").write_text(json.dumps(config))
    weights = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("value.lora_B.weight"))
    weights[key][0, 0] = float("nan")
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match="self.value's LoRA B holds NaN or infinity"):
        import_peft(registry, backbone, "acme", "bad", bad, labels=labels)
    # finite in float64, infinite in the float32 it is served in: refused as well
    weights[key] = weights[key].double()
    weights[key][0, 0] = 1e300
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match="self.value's LoRA B holds NaN or infinity"):
        import_peft(registry, backbone, "acme", "bad", bad, labels=labels)
    (bad / "labels.txt").write_text("\n \n")
    with pytest.raises(AdapterFormatError, match="labels.txt lists no labels"):
        import_peft(registry, backbone, "acme", "bad", bad)
    for id2label in ('{"zero": "ham"}', '{"\\u00b2": "ham"}'):  # "²" passes isdigit(), not int()
        (bad / "config.json").write_text(f'{{"id2label": {id2label}}}')
        with pytest.raises(AdapterFormatError, match="id2label must map class indices"):
            import_peft(registry, backbone, "acme", "bad", bad)
    # the head's row i is class i: anything but 0..n-1, each once, would shift the labels
    for id2label in (
        '{"1": "ham", "2": "spam"}',
        '{"0": "ham", "2": "spam"}',
        '{"0": "ham", "00": "spam"}',
    ):
        (bad / "config.json").write_text(f'{{"id2label": {id2label}}}')
        with pytest.raises(AdapterFormatError, match="must number its classes 0 to 1, each once"):
            import_peft(registry, backbone, "acme", "bad", bad)
    assert registry.list_adapters("acme") == []
    registry.close()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"target_modules": ["nonexistent"]},
            "does not target bert.encoder.layer.0.attention.self.query",
        ),
        (
            {"target_modules": ["query"]},
            "does not target bert.encoder.layer.0.attention.self.value",
        ),
        (
            {"target_modules": r".*\.query"},
            "does not target bert.encoder.layer.0.attention.self.value",
        ),
        ({"layers_to_transform": [0]}, "does not target bert.encoder.layer.1.attention.self.query"),
        (
            {"layers_to_transform": 5, "layers_pattern": "layer"},
            "does not target bert.encoder.layer.0",
        ),
        (
            {"exclude_modules": ["value"]},
            "does not target bert.encoder.layer.0.attention.self.value",
        ),
        ({"target_modules": "("}, "target_modules '\\(' is not a valid pattern"),
        ({"layers_to_transform": "0"}, "layers_to_transform must be an integer or a list"),
        ({"layers_to_transform": [0.5]}, "layers_to_transform must be an integer or a list"),
        ({"layers_to_transform": [0], "layers_pattern": 5}, "layers_pattern must be a string"),
        ({"layers_to_transform": [0], "layers_pattern": [5]}, "layers_pattern must hold strings"),
        (
            {"layers_to_transform": [0], "layers_pattern": "("},
            "layers_pattern '\\(' is not a valid",
        ),
        # found by a fuzzing review: each served the factors as plain LoRA, up to 0.41 off
        # PEFT's probabilities, or files PEFT refuses to load
        ({"target_modules": None}, "target_modules is null, so PEFT would pick its defaults"),
        ({"layers_pattern": "layer"}, "layers_pattern needs layers_to_transform"),
        (
            {"target_modules": ".*(query|value)", "layers_to_transform": [0]},
            "layers_to_transform cannot narrow a target_modules string",
        ),
        ({"alora_invocation_tokens": [1996]}, r"Activated LoRA \(aLoRA\) adapters are not"),
        ({"layer_replication": [[0, 4], [2, 6]]}, "Layer-replicating adapters are not supported"),
        ({"kasa_config": {}}, "KaSA adapters are not supported"),
        ({"use_bdlora": True}, "BD-LoRA adapters are not supported"),
    ],
)
def test_import_refuses_weights_peft_would_not_apply(
    backbone, peft_adapters, tmp_path: Path, change, match
) -> None:
    """PEFT wraps only the modules its config selects and ignores the file's other factors
    (or, selecting none, refuses the files): graft serving them would answer otherwise."""
    src, labels, _ = peft_adapters["qv-r8"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(
        (src / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads((src / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with Registry(tmp_path / "reg") as registry:
        registry.create_tenant("acme")
        with pytest.raises(AdapterFormatError, match=match):
            import_peft(registry, backbone, "acme", "bad", bad, labels=labels)
        assert registry.list_adapters("acme") == []


@pytest.mark.parametrize("rank", [8, 0])
async def test_a_graft_version_imports_with_its_own_pooling_and_labels(
    backbone, publish_random, tmp_path: Path, rank
) -> None:
    """A version directory of graft's (from another registry) holds a mean-pooling head that
    its PEFT files cannot say: its manifest does, and the import follows it."""
    with Registry(tmp_path / "reg") as registry:
        registry.create_tenant("acme")
        registry.create_tenant("globex")
        labels = ("ham", "spam", "eggs")
        mine = publish_random(registry, "acme", "spam", seed=3, rank=rank, labels=labels)
        copy = import_peft(registry, backbone, "globex", "spam", mine.path)
        assert copy.labels == labels and copy.manifest["pooling"] == "mean"
        assert copy.manifest["source"] == "graft-import" and copy.rank == rank
        elsewhere = tmp_path / "other-base"
        shutil.copytree(mine.path, elsewhere)
        manifest = json.loads((elsewhere / "graft_manifest.json").read_text())
        manifest["base_sha256"] = "0" * 64
        (elsewhere / "graft_manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(AdapterFormatError, match="trained on base model 000000000000"):
            import_peft(registry, backbone, "globex", "other", elsewhere)
    async with Engine(EngineConfig(registry_dir=tmp_path / "reg")) as engine:
        mine_preds = await engine.classify("acme", "spam", TEXTS)
        copy_preds = await engine.classify("globex", "spam", TEXTS)
    assert [p.scores for p in copy_preds] == [p.scores for p in mine_preds]


async def test_peft_loads_what_graft_writes_as_graft_serves_it(
    backbone, write_random_adapter, tmp_path: Path
) -> None:
    """graft's PEFT files name the modules they hold whole: as suffixes ("dense") PEFT also
    wrapped modules without factors (the pooler, intermediate.dense) and warned of missing
    keys."""
    from transformers import AutoModelForSequenceClassification

    src = tmp_path / "written"
    targets = ("query", "output.dense")  # not the pooler's dense
    write_random_adapter(backbone, src, seed=5, rank=4, num_labels=3, targets=targets)
    factors = [k for k in load_file(str(src / "adapter_model.safetensors")) if "lora_A" in k]
    base = AutoModelForSequenceClassification.from_pretrained(
        str(backbone.path), num_labels=3, local_files_only=True
    )
    model = peft.PeftModel.from_pretrained(base, str(src)).eval()
    wrapped = [n for n, m in model.named_modules() if n.endswith("lora_A")]
    assert len(wrapped) == len(factors) > 0
    enc = backbone.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = torch.softmax(model(**enc).logits, dim=-1)
    labels = ["a", "b", "c"]
    with Registry(tmp_path / "reg") as registry:
        registry.create_tenant("acme")
        import_peft(registry, backbone, "acme", "written", src, labels=labels)
    async with Engine(EngineConfig(registry_dir=tmp_path / "reg")) as engine:
        preds = await engine.classify("acme", "written", TEXTS)
    got = torch.tensor([[p.scores[label] for label in labels] for p in preds])
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-4)
