"""parse_adapter: tensors viewed in place, every check still made when a header is cached."""

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from engine import AdapterFormatError, parse_adapter
from engine.adapter_layout import adapter_layout
from engine.memory import AdapterMemory

LABELS = ("neg", "pos")
PREFIX = "base_model.model.bert."
QUERY = "encoder.layer.0.attention.self.query"


@pytest.fixture
def files(backbone, tmp_path: Path, write_random_adapter) -> tuple[bytes, bytes]:
    write_random_adapter(backbone, tmp_path, seed=3, rank=4, num_labels=2)
    config = (tmp_path / "adapter_config.json").read_bytes()
    return config, (tmp_path / "adapter_model.safetensors").read_bytes()


def _weights_file(tensors: dict[str, torch.Tensor]) -> bytearray:
    return bytearray(save(tensors))


def _lora(backbone, rank: int = 4, dtype=torch.float32) -> dict[str, torch.Tensor]:
    wrapper = backbone.linears[QUERY]
    gen = torch.Generator().manual_seed(0)
    return {
        f"{PREFIX}{QUERY}.lora_A.weight": torch.randn(rank, wrapper.in_features, generator=gen).to(
            dtype
        ),
        f"{PREFIX}{QUERY}.lora_B.weight": torch.randn(wrapper.out_features, rank, generator=gen).to(
            dtype
        ),
        "base_model.model.classifier.weight": torch.randn(2, backbone.hidden_size).to(dtype),
        "base_model.model.classifier.bias": torch.zeros(2).to(dtype),
    }


def test_tensors_view_the_verified_bytes_without_a_copy(backbone, files) -> None:
    config, weights = files
    data = bytearray(weights)
    parsed = parse_adapter(config, data, LABELS, "mean", backbone)
    module = parsed.modules[QUERY]
    start = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    assert start <= module.a.data_ptr() < start + len(data)
    # the same values the safetensors library reads
    from safetensors.torch import load

    expected = load(bytes(weights))[f"{PREFIX}{QUERY}.lora_A.weight"]
    assert torch.equal(module.a, expected)


def test_bytes_are_parsed_the_same_as_a_bytearray(backbone, files) -> None:
    config, weights = files
    from_bytes = parse_adapter(config, weights, LABELS, "mean", backbone)
    from_array = parse_adapter(config, bytearray(weights), LABELS, "mean", backbone)
    for name, module in from_bytes.modules.items():
        assert torch.equal(module.a, from_array.modules[name].a)
        assert torch.equal(module.b, from_array.modules[name].b)
    assert torch.equal(from_bytes.head.weight, from_array.head.weight)


def test_a_cached_header_still_checks_labels_and_length(backbone, files) -> None:
    config, weights = files
    parse_adapter(config, weights, LABELS, "mean", backbone)  # header now cached
    with pytest.raises(AdapterFormatError, match=r"classifier.weight is \(2, 384\)"):
        parse_adapter(config, weights, ("a", "b", "c"), "mean", backbone)
    with pytest.raises(AdapterFormatError, match="truncated"):
        parse_adapter(config, weights[:-16], LABELS, "mean", backbone)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda t: t.pop(f"{PREFIX}{QUERY}.lora_B.weight"), "needs both lora_A and lora_B"),
        (lambda t: t.pop("base_model.model.classifier.weight"), "no classifier head"),
        (
            lambda t: t.update({f"{PREFIX}encoder.nope.lora_A.weight": torch.zeros(4, 384)}),
            "not a Linear of the backbone",
        ),
        (lambda t: t.update({"base_model.model.other": torch.zeros(1)}), "unexpected tensor"),
        (  # the same factor, without the backbone's prefix: PEFT would load the other one
            lambda t: t.update({f"base_model.model.{QUERY}.lora_A.weight": torch.zeros(4, 384)}),
            f"two lora_A tensors for {QUERY}",
        ),
        (  # the same factor under a second adapter name
            lambda t: t.update({f"{PREFIX}{QUERY}.lora_B.other.weight": torch.zeros(384, 4)}),
            f"two lora_B tensors for {QUERY}",
        ),
        (
            lambda t: t.update({f"{PREFIX}{QUERY}.lora_A.weight": torch.zeros(4, 100)}),
            r"lora_A is \(4, 100\)",
        ),
        (
            lambda t: t.update({f"{PREFIX}{QUERY}.lora_B.weight": torch.zeros(384, 3)}),
            r"lora_B is \(384, 3\)",
        ),
        (
            lambda t: t.update({f"{PREFIX}{QUERY}.lora_A.weight": torch.zeros(4, 384).int()}),
            "is I32",
        ),
    ],
)
def test_bad_files_are_refused_with_the_problem_named(backbone, files, change, problem) -> None:
    tensors = _lora(backbone)
    change(tensors)
    with pytest.raises(AdapterFormatError, match=problem):
        parse_adapter(files[0], _weights_file(tensors), LABELS, "mean", backbone)


def test_not_a_safetensors_file_is_refused(backbone, files) -> None:
    for junk in (b"", b"1234", struct.pack("<Q", 10**6) + b"{}"):
        with pytest.raises(AdapterFormatError, match="not a safetensors file"):
            parse_adapter(files[0], junk, LABELS, "mean", backbone)


def test_half_precision_factors_are_widened_once_packed(backbone, files) -> None:
    """Parsing views the stored float16 (no copy); packing converts into the pool's float32."""
    tensors = _lora(backbone, dtype=torch.float16)
    parsed = parse_adapter(files[0], _weights_file(tensors), LABELS, "mean", backbone)
    stored = tensors[f"{PREFIX}{QUERY}.lora_A.weight"]
    assert parsed.modules[QUERY].a.dtype == torch.float16
    assert torch.equal(parsed.modules[QUERY].a, stored)
    packed = AdapterMemory(backbone, 16, "cpu", torch.float32).pack(parsed)
    assert packed.modules[QUERY].a.dtype == torch.float32
    assert torch.equal(packed.modules[QUERY].a, stored.float())


def test_a_misaligned_tensor_is_copied_not_viewed_askew(backbone, files) -> None:
    """safetensors writers align tensors, but the format does not promise it."""
    tensors = _lora(backbone)
    names = sorted(tensors)
    # two bytes no tensor claims come first, so every float32 after them is misaligned
    blobs, header, offset = [b"\0\0"], {"__metadata__": {"format": "pt"}}, 2
    for name in names:
        data = tensors[name].numpy().tobytes()
        header[name] = {
            "dtype": "F32",
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = bytearray(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    parsed = parse_adapter(files[0], data, LABELS, "mean", backbone)
    assert torch.equal(parsed.modules[QUERY].a, tensors[f"{PREFIX}{QUERY}.lora_A.weight"])
    assert torch.equal(parsed.head.weight, tensors["base_model.model.classifier.weight"])


def test_one_layout_is_kept_per_distinct_header(backbone, files) -> None:
    config, weights = files
    first = adapter_layout(bytearray(weights), backbone)
    again = adapter_layout(bytearray(weights), backbone)
    assert again is first
    other = adapter_layout(_weights_file(_lora(backbone)), backbone)
    assert other is not first


def test_a_registered_alpha_written_as_a_string_still_loads(backbone, files) -> None:
    """Import now refuses a non-number lora_alpha, but versions registered before that must
    keep serving: loading reads "16" as 16, and only what is no number at all is refused."""
    config, weights = files
    written = json.loads(config)
    as_number = parse_adapter(config, weights, LABELS, "mean", backbone)
    as_text = json.dumps({**written, "lora_alpha": str(written.get("lora_alpha", 8))}).encode()
    assert parse_adapter(as_text, weights, LABELS, "mean", backbone).modules[QUERY].scale == (
        as_number.modules[QUERY].scale
    )
    junk = json.dumps({**written, "lora_alpha": "sixteen"}).encode()
    with pytest.raises(AdapterFormatError, match="lora_alpha for .* must be a number"):
        parse_adapter(junk, weights, LABELS, "mean", backbone)
