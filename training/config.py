"""Training knobs, with defaults that work for about a thousand examples."""

import math
from dataclasses import dataclass

from registry import shown

# head: frozen backbone, only the head on cached embeddings (cheapest, no LoRA weights)
# lora: LoRA factors + head on the frozen backbone (the default)
# full: every backbone weight + head, written out as a standalone model directory
MODES = ("head", "lora", "full")
# how head and lora store their weights: float16 halves the file a cold load reads and hashes
WEIGHTS_DTYPES = ("float16", "float32")
# Upper bounds. Past them a value is a typo rather than a plan: warm-up is a share of every
# epoch's steps, so a million epochs would leave the learning rate near zero until early stopping.
_AT_MOST = {
    "rank": 64,
    "epochs": 1_000,
    "head_epochs": 100_000,
    "batch_size": 4_096,
    "patience": 1_000,
    "head_patience": 100_000,
}


@dataclass(frozen=True, slots=True)
class TrainConfig:
    mode: str = "lora"  # one of MODES
    rank: int = 8  # LoRA rank on every targeted module
    alpha: float = 16.0  # LoRA scale is alpha / rank
    epochs: int = 5  # upper bound; early stopping may end sooner
    batch_size: int = 16
    lora_lr: float = 1e-3  # AdamW learning rate of the LoRA factors
    head_lr: float = 3e-3  # AdamW learning rate of the classification head
    backbone_lr: float = 4e-5  # full mode: AdamW learning rate of every backbone weight
    head_epochs: int = 200  # head mode: upper bound on epochs over the cached embeddings
    head_patience: int = 20  # head mode: epochs without validation improvement before stopping
    weight_decay: float = 0.01
    warmup_fraction: float = 0.06  # of all steps, linear warm-up then linear decay
    max_length: int = 128  # tokens per training text (longer texts are cut)
    eval_fraction: float = 0.2  # held-out split kept for the reported metrics
    val_fraction: float = 0.1  # of the rest, used for early stopping
    patience: int = 2  # epochs without validation improvement before stopping
    seed: int = 0
    targets: tuple[str, ...] = ()  # linear-name suffixes; () = every linear outside the pooler
    class_weighting: bool = True  # weigh the loss by inverse class frequency
    max_examples: int | None = None  # train on a stratified sample of this size
    weights_dtype: str = "float16"  # one of WEIGHTS_DTYPES (float32 where float16 overflows)
    # held-out texts are read as the serving engine reads them: up to its input limit (None:
    # the backbone's), not cut at max_length, so the recorded metrics are the served model's
    eval_max_tokens: int | None = None

    def eval_length(self, backbone_max_tokens: int) -> int:
        """Tokens per held-out text: full mode's own limit is max_length (it stores it)."""
        if self.mode == "full":
            return self.max_length
        return min(self.eval_max_tokens or backbone_max_tokens, backbone_max_tokens)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {shown(self.mode)}")
        if self.weights_dtype not in WEIGHTS_DTYPES:
            raise ValueError(
                f"weights_dtype must be one of {', '.join(WEIGHTS_DTYPES)}, "
                f"got {shown(self.weights_dtype)}"
            )
        positive = (
            "rank",
            "epochs",
            "batch_size",
            "max_length",
            "patience",
            "head_epochs",
            "head_patience",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {_shown(getattr(self, name))}")
        if self.max_length < 3:  # the tokenizer then cuts nothing: whole texts would train
            raise ValueError(
                f"max_length must be >= 3 (the special tokens and one of text), "
                f"got {self.max_length}"
            )
        for name, most in _AT_MOST.items():
            if getattr(self, name) > most:
                raise ValueError(
                    f"{name} must be at most {most:,}, got {_shown(getattr(self, name))}"
                )
        for name in ("lora_lr", "head_lr", "backbone_lr", "alpha"):
            if not 0 < getattr(self, name) < math.inf:  # also refuses nan
                raise ValueError(f"{name} must be > 0 and finite, got {getattr(self, name)}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay must be >= 0 and finite, got {self.weight_decay}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        for name in ("eval_fraction", "val_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {getattr(self, name)}")
        if self.eval_max_tokens is not None and self.eval_max_tokens < 3:
            raise ValueError(f"eval_max_tokens must be >= 3, got {self.eval_max_tokens}")
        if self.max_examples is not None and self.max_examples < 10:
            raise ValueError(f"max_examples must be >= 10, got {self.max_examples}")


def _shown(value: object) -> str:
    """A refused value as an error shows it: a 1,000-digit number cut short."""
    text = repr(value)
    return text if len(text) <= 30 else f"{text[:27]}..."
