"""Fixtures for the registry tests: a registry with tenant "acme", and real adapter directories."""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from registry import Registry


def write_adapter_dir(directory: Path, *, rank: int = 4, hidden: int = 8, seed: int = 0) -> Path:
    """A small PEFT-shaped adapter directory: config, safetensors weights, an eval set."""
    directory.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["query"]}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    prefix = "base_model.model.encoder.layer.0.attention.self.query"
    tensors = {
        f"{prefix}.lora_A.weight": rng.standard_normal((rank, hidden)).astype(np.float32),
        f"{prefix}.lora_B.weight": rng.standard_normal((hidden, rank)).astype(np.float32),
        "classifier.weight": rng.standard_normal((2, hidden)).astype(np.float32),
    }
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "eval.jsonl").write_text('{"text": "win money now", "label": "spam"}\n')
    return directory


@pytest.fixture
def make_adapter(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_adapter(seed=1) -> a fresh adapter directory; other seeds, other bytes."""
    counter = iter(range(1_000_000))

    def make(**kwargs: Any) -> Path:
        return write_adapter_dir(tmp_path / f"src-{next(counter)}", **kwargs)

    return make


@pytest.fixture
def manifest() -> dict[str, Any]:
    return {
        "labels": ["ham", "spam"],
        "base_sha256": "ab" * 32,
        "rank": 4,
        "metrics": {"accuracy": 0.93, "macro_f1": 0.9},
        "data": {"num_train_examples": 120},
    }


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as opened:
        opened.create_tenant("acme")
        yield opened
