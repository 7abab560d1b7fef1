"""Classification metrics for held-out evaluation (accuracy, macro-F1, per-class F1)."""

from collections.abc import Sequence
from typing import Any


def classification_metrics(
    gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
) -> dict[str, Any]:
    """Accuracy and macro-F1 over ``labels`` (a class absent from both sides scores F1 0)."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold labels but {len(predicted)} predictions")
    if not gold:
        return {"accuracy": 0.0, "macro_f1": 0.0, "num_examples": 0, "f1": {}}
    correct = sum(g == p for g, p in zip(gold, predicted, strict=True))
    per_class = {}
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(gold, predicted, strict=True))
        fp = sum(g != label and p == label for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label and p != label for g, p in zip(gold, predicted, strict=True))
        denom = 2 * tp + fp + fn
        per_class[label] = 2 * tp / denom if denom else 0.0
    return {
        "accuracy": correct / len(gold),
        "macro_f1": sum(per_class.values()) / len(per_class),
        "num_examples": len(gold),
        "f1": per_class,
    }
