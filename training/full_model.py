"""Full mode: every backbone weight and the head trained, the quality ceiling for comparison.

The result is never served by the shared engine; it is written as a standalone directory:

    config.json, model.safetensors  the fine-tuned encoder (``save_pretrained``, AutoModel loads it)
    tokenizer files                 the backbone's tokenizer, unchanged
    graft_head.safetensors          ``weight`` [C, H] and ``bias`` [C] over mean-pooled states
    graft_model.json                mode, labels, pooling, max_length, base model, metrics, config

``load_full_model`` reads it back for prediction. Training runs on a deep copy of the backbone's
encoder with the LoRA wrappers taken out, so the shared frozen backbone is never touched.
"""

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from engine import POOLING_MEAN, Backbone
from engine.lora import LoraLinear
from training.config import TrainConfig
from training.loop import predict_labels, run_epochs
from training.progress import OnEvent
from training.recipe import Fitted, Split, detached_copy, mean_pool

HEAD_FILE = "graft_head.safetensors"
META_FILE = "graft_model.json"


class EncoderClassifier(nn.Module):
    """Mean-pooled encoder output through a Linear head: input_ids, mask [B, T] -> logits [B, C]."""

    def __init__(self, encoder: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return self.head(mean_pool(hidden, mask))


def trainable_copy(backbone: Backbone) -> nn.Module:
    """A float32 copy of the backbone's encoder, every LoraLinear replaced by its plain Linear.

    The copy shares no tensor with the backbone, and its state_dict has the keys of the
    original Hugging Face model, so ``save_pretrained`` writes a directory AutoModel loads.
    """
    encoder = copy.deepcopy(backbone.model)
    wrapped = [(n, m) for n, m in encoder.named_modules() if isinstance(m, LoraLinear)]
    for name, wrapper in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = encoder.get_submodule(parent_name) if parent_name else encoder
        setattr(parent, child, wrapper.base)
    return encoder.float().requires_grad_(True)


def fit_full(
    backbone: Backbone,
    split: Split,
    config: TrainConfig,
    progress: bool,
    on_event: OnEvent | None = None,
) -> Fitted:
    """Fine-tune a copy of the encoder plus a head; dropout draws come from ``config.seed``."""
    with torch.random.fork_rng(devices=[]):  # seed dropout without moving the caller's RNG
        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        head = nn.Linear(backbone.hidden_size, len(split.labels))
        nn.init.normal_(head.weight, std=0.02, generator=generator)
        nn.init.zeros_(head.bias)
        model = EncoderClassifier(trainable_copy(backbone), head)
        epochs_run = run_epochs(
            model,
            [
                {"params": list(model.encoder.parameters()), "lr": config.backbone_lr},
                {"params": list(head.parameters()), "lr": config.head_lr},
            ],
            backbone,
            split,
            config,
            snapshot=lambda: detached_copy(model.state_dict()),
            progress=progress,
            desc="full",
            on_event=on_event,
        )
    length = config.eval_length(backbone.max_tokens)  # max_length: the model's own limit
    predictions = predict_labels(model, backbone, split.held_out, split.labels, length)
    model.requires_grad_(False)
    return Fitted(head, predictions, epochs_run, encoder=model.encoder)


def check_output_dir(output_dir: Path | None) -> Path:
    """The directory full mode will create; refused early, before any training."""
    if output_dir is None:
        raise ValueError("mode 'full' writes a standalone model directory: pass output_dir")
    output_dir = Path(output_dir)
    cwd = Path.cwd().resolve()
    if output_dir.resolve() in (cwd, *cwd.parents):  # replaced at the end: not while in use
        raise ValueError(f"{output_dir}: is the current directory or holds it; name a new one")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ValueError(f"{output_dir}: exists and is not an empty directory")
    parent = output_dir.absolute().parent
    while not parent.exists():  # the nearest ancestor there is: the one it is created in
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{output_dir}: cannot be created, {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{output_dir}: cannot be created, {parent} is not writable")
    return output_dir


def write_full_model(
    output_dir: Path,
    backbone: Backbone,
    fitted: Fitted,
    labels: tuple[str, ...],
    max_length: int,
    extra: dict[str, Any],
) -> int:
    """Write the directory atomically (staged beside it, then renamed); returns its bytes."""
    output_dir = check_output_dir(output_dir)
    if fitted.encoder is None:
        raise ValueError("full-mode result without an encoder")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        fitted.encoder.save_pretrained(str(staging), safe_serialization=True)
        backbone.tokenizer.save_pretrained(str(staging))
        head = {
            "weight": fitted.head.weight.detach().float().contiguous(),
            "bias": fitted.head.bias.detach().float().contiguous(),
        }
        save_file(head, str(staging / HEAD_FILE))
        meta = {
            "mode": "full",
            "labels": list(labels),
            "pooling": POOLING_MEAN,
            "max_length": max_length,
            "base_model": backbone.name,
            "base_sha256": backbone.sha256,
            **extra,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if output_dir.exists():
            output_dir.rmdir()  # checked empty above
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sum(p.stat().st_size for p in output_dir.rglob("*") if p.is_file())


@dataclass(frozen=True, slots=True)
class FullModel:
    """A directory written by full mode, loaded for prediction."""

    model: EncoderClassifier  # eval mode
    tokenizer: PreTrainedTokenizerBase
    labels: tuple[str, ...]
    max_length: int  # tokens per text, as in training

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_rows: int = 64) -> list[str]:
        predicted: list[str] = []
        for start in range(0, len(texts), batch_rows):
            enc = self.tokenizer(
                list(texts[start : start + batch_rows]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            logits = self.model(enc["input_ids"], enc["attention_mask"])
            predicted += [self.labels[i] for i in logits.argmax(dim=-1).tolist()]
        return predicted


def load_full_model(model_dir: str | Path) -> FullModel:
    """Read a full-mode directory back (safetensors only; nothing is unpickled)."""
    model_dir = Path(model_dir)
    if not (model_dir / META_FILE).is_file():
        raise ValueError(f"{model_dir}: no {META_FILE}; not a directory written by full mode")
    meta = json.loads((model_dir / META_FILE).read_text())
    encoder = AutoModel.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True)
    tensors = load_file(str(model_dir / HEAD_FILE))
    head = nn.Linear(tensors["weight"].shape[1], tensors["weight"].shape[0])
    head.load_state_dict(tensors)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = EncoderClassifier(encoder, head).eval().requires_grad_(False)
    return FullModel(model, tokenizer, tuple(meta["labels"]), int(meta["max_length"]))
