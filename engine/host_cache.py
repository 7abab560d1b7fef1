"""Host tier: parsed adapters in a byte-budgeted LRU (pinned memory on CUDA).

Queued requests pin their adapter here, so a request's weights are on the host from
admission until it finishes and the step never waits on the disk.
"""

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engine.adapters import AdapterWeights


@dataclass(slots=True)
class _Entry:
    weights: AdapterWeights
    num_bytes: int
    pins: int = 0
    forgotten: bool = False  # its version was deleted: dropped at its last unpin


class HostCache:
    """LRU over unpinned entries under ``max_bytes``; pinned entries may overshoot it.

    Thread-safe: the event loop pins and inserts, the model thread reads during page-in.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"host cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def lookup(self, key: str) -> bool:
        """Whether ``key`` is here, counted as a hit or a miss (and refreshed on a hit)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.num_hits += 1
                return True
            self.num_misses += 1
            return False

    def get(self, key: str) -> AdapterWeights:
        with self._lock:
            return self._entries[key].weights

    def put_pinned(self, key: str, weights: AdapterWeights) -> None:
        """Insert (if absent) and pin in one step, so the entry cannot be evicted in between."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = _Entry(weights=weights, num_bytes=weights.num_bytes)
                self._entries[key] = entry
                self.num_bytes += entry.num_bytes
            self._entries.move_to_end(key)
            entry.pins += 1
            self._shrink()

    def pin(self, key: str) -> None:
        with self._lock:
            self._entries[key].pins += 1

    def pin_present(self, keys: Sequence[str]) -> tuple[str, ...]:
        """Pin those of ``keys`` that are here, under one lock; returns them."""
        with self._lock:
            present = tuple(key for key in keys if key in self._entries)
            for key in present:
                self._entries[key].pins += 1
            return present

    def unpin_all(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                entry = self._entries[key]
                if entry.pins <= 0:
                    raise RuntimeError(f"unpin of {key} without a matching pin")
                entry.pins -= 1
                if entry.pins == 0 and entry.forgotten:
                    self._pop(key)
            self._shrink()

    def pin_if_present(self, key: str, *, count_miss: bool = False) -> bool:
        """Pin ``key`` if it is here (a hit, refreshed); False otherwise, a miss only if
        ``count_miss`` (a caller that will look again counts its miss once)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.num_misses += count_miss
                return False
            self._entries.move_to_end(key)
            self.num_hits += 1
            entry.pins += 1
            return True

    def unpin(self, key: str) -> None:
        self.unpin_all((key,))

    def forget(self, key: str) -> None:
        """Drop a deleted version now, or at its last unpin while requests hold it."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return
            entry.forgotten = True
            if entry.pins == 0:
                self._pop(key)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    def is_forgotten(self, key: str) -> bool:
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and entry.forgotten

    def _pop(self, key: str) -> None:
        self.num_bytes -= self._entries.pop(key).num_bytes

    def pins(self, key: str) -> int:
        with self._lock:
            entry = self._entries.get(key)
            return entry.pins if entry else 0

    def _shrink(self) -> None:
        """Drop least recently used unpinned entries until the budget holds (lock held)."""
        if self.num_bytes <= self.max_bytes:
            return
        for key in [k for k, e in self._entries.items() if e.pins == 0]:
            if self.num_bytes <= self.max_bytes:
                break
            entry = self._entries.pop(key)
            self.num_bytes -= entry.num_bytes
            self.num_evictions += 1
