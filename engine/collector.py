"""Short pauses from Python's cycle collector in a long-running engine.

A full collection walks every tracked object with every thread stopped. Right after start-up
that is about 400k objects (torch, transformers, the tokenizer, the backbone's modules), and
one pass took 235 ms on this project's 2-core VM: a stall that lands in some request's latency
whenever the collector decides to run. Those objects live as long as the engine, so once it
has started they are frozen (``gc.freeze``): later passes skip them (0.0 ms right after, 5 ms
with 1,000 adapters loaded). Frozen objects are never collected as cycles; the last engine to
close unfreezes them.
"""

import gc
import threading

_lock = threading.Lock()
_num_freezers = 0  # engines started with gc_freeze and not yet closed


def freeze_startup_objects() -> None:
    """Collect what is garbage now, then take every live object out of later passes."""
    global _num_freezers
    with _lock:
        gc.collect()
        gc.freeze()
        _num_freezers += 1


def release_startup_objects() -> None:
    """Undo one freeze; the last one out hands the objects back to the collector."""
    global _num_freezers
    with _lock:
        if _num_freezers == 0:
            return
        _num_freezers -= 1
        if _num_freezers == 0:
            gc.unfreeze()
