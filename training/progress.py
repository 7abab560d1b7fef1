"""Per-epoch progress for callers of `train_adapter` that want more than a progress bar (the
HTTP training job's event stream)."""

from collections.abc import Callable
from typing import Any

OnEvent = Callable[[dict[str, Any]], None]


def epoch_event(
    epoch: int, max_epochs: int, loss: float, val_macro_f1: float, elapsed_s: float
) -> dict[str, Any]:
    """What ``on_event`` receives after each epoch: epoch (1-based), epochs (the upper bound),
    the mean training loss of the epoch, validation macro-F1 and the seconds left if every
    remaining epoch runs as long as the average so far (early stopping may end sooner)."""
    eta_s = elapsed_s / epoch * (max_epochs - epoch)
    return {
        "epoch": epoch,
        "epochs": max_epochs,
        "loss": round(loss, 6),
        "val_macro_f1": round(val_macro_f1, 6),
        "eta_s": round(eta_s, 1),
    }
