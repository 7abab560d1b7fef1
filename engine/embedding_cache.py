"""Pooled backbone outputs of repeated texts, for head-only models: a byte-bounded LRU.

A head-only model's answer is its head applied to the pooled output of the bare backbone, so a
text seen before needs no backbone pass at all. LoRA models change the backbone's activations
and are never served from here. The tenant is part of every key: a hit is faster than a miss,
and one tenant must not be able to time whether another sent the same text.
"""

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# dict slot, key tuple and its strings, ndarray header: counted so the budget tracks real memory
ENTRY_OVERHEAD_BYTES = 512


@dataclass(frozen=True, slots=True)
class EmbeddingKey:
    """What a pooled output depends on: the model input, the weights that saw it, the pooling."""

    tenant: str  # whose request computed it; never shared across tenants
    backbone_sha256: str  # weights identity: another backbone never hits
    pooling: str  # one of engine.adapters.POOLINGS
    tokens_sha256: str  # hash of the token ids the model saw (truncation already applied)


def tokens_sha256(token_ids: Sequence[int]) -> str:
    """SHA-256 of token ids as little-endian int64: equal ids, equal hash, on every platform."""
    return hashlib.sha256(np.asarray(token_ids, dtype="<i8").tobytes()).hexdigest()


class EmbeddingCache:
    """LRU of float32 pooled vectors under ``max_bytes`` (0 disables it: nothing is stored).

    Not thread-safe: the engine uses it from the event loop only (lookups at admission,
    inserts when a step's results are delivered).
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"embedding cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[EmbeddingKey, np.ndarray] = OrderedDict()
        self.num_bytes = 0
        self.num_hits = 0
        self.num_misses = 0
        self.num_evictions = 0
        # bumped by each clear: a request admitted before one must not put back what it
        # cleared (a deleted tenant's texts) when its backbone rows are delivered after
        self.generation = 0

    @property
    def is_enabled(self) -> bool:
        return self.max_bytes > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_all(self, keys: Sequence[EmbeddingKey]) -> list[np.ndarray] | None:
        """The vectors of every key, refreshed as recently used: one hit. If any is missing,
        None and one miss (the caller runs the backbone for the whole set)."""
        if not self.is_enabled:
            return None
        found = [self._entries.get(key) for key in keys]
        if any(vector is None for vector in found):
            self.num_misses += 1
            return None
        for key in keys:
            self._entries.move_to_end(key)
        self.num_hits += 1
        return found  # type: ignore[return-value]  # None was ruled out above

    def put(self, key: EmbeddingKey, vector: np.ndarray) -> None:
        """Store a copy of ``vector`` (read-only) and evict the least recently used to fit."""
        stored = np.array(vector, dtype=np.float32, copy=True)
        if _cost(stored) > self.max_bytes:
            return
        stored.flags.writeable = False  # shared by every later hit
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.num_bytes -= _cost(previous)
        self._entries[key] = stored
        self.num_bytes += _cost(stored)
        while self.num_bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= _cost(evicted)
            self.num_evictions += 1

    def clear(self) -> None:
        """Forget everything (a deletion, a backbone reload): the counters keep their
        history."""
        self._entries.clear()
        self.num_bytes = 0
        self.generation += 1

    def stats(self) -> dict[str, int]:
        return {
            "embedding_cache_hits": self.num_hits,
            "embedding_cache_misses": self.num_misses,
            "embedding_cache_evictions": self.num_evictions,
            "embedding_cache_entries": len(self._entries),
            "embedding_cache_bytes": self.num_bytes,
        }


def _cost(vector: np.ndarray) -> int:
    return vector.nbytes + ENTRY_OVERHEAD_BYTES
