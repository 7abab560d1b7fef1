"""Adapter memory: LoRA rows in per-module page pools, heads alongside, LRU over idle adapters.

A page is one rank-row of one module's A (width ``in``) and the matching row of B transposed
(width ``out``). A rank-r adapter takes r pages, the same page numbers in every module it
targets, so ranks 4..64 share the pools without padding to the largest. Page 0 is reserved
and stays zero in every pool: kernels pad page lists with it, and it adds nothing.
"""

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.adapters import AdapterWeights, Head
from engine.backbone import Backbone
from engine.errors import EngineOverloaded

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Resident:
    """An adapter whose weights sit in the pools; mutable bookkeeping owned by AdapterMemory."""

    key: str  # "tenant/name@version"
    pages: tuple[int, ...]  # pool rows, len == rank
    rank_by_module: torch.Tensor  # int32 [M], 0 where the adapter has no LoRA
    scale_by_module: torch.Tensor  # float32 [M]
    head: Head  # on the engine's device
    num_bytes: int
    refcount: int = 0  # requests holding it; never evicted while > 0


class AdapterMemory:
    """Owns the page pools and decides which adapters stay resident.

    Not thread-safe: the engine calls it from its single model thread only.
    """

    def __init__(self, backbone: Backbone, num_pages: int, device: str, dtype: torch.dtype) -> None:
        if num_pages < 1:
            raise ValueError(f"adapter pool needs at least 1 page, got {num_pages}")
        self._backbone = backbone
        self._device = device
        self._dtype = dtype
        self.num_pages = num_pages
        self.dtype = dtype
        self._names = backbone.linear_names
        self._pools = [self._new_pool(name) for name in self._names]
        self._dirty: list[set[int]] = [set() for _ in self._names]  # pages holding values
        self._free = FreePages(1, num_pages)
        self._resident: OrderedDict[str, Resident] = OrderedDict()
        self.num_hits = 0
        self.num_loads = 0
        self.num_evictions = 0

    @property
    def pools(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return tuple(self._pools)

    @property
    def num_free_pages(self) -> int:
        return self._free.count

    @property
    def num_resident(self) -> int:
        return len(self._resident)

    @property
    def resident_bytes(self) -> int:
        return sum(r.num_bytes for r in self._resident.values())

    def is_resident(self, key: str) -> bool:
        return key in self._resident

    def get(self, key: str) -> Resident:
        return self._resident[key]

    def acquire(self, key: str, load: Callable[[], AdapterWeights]) -> Resident:
        """Pin an adapter, loading it first if needed (``load`` runs only on a miss)."""
        resident = self._resident.get(key)
        if resident is None:
            resident = self._admit(key, load())
        else:
            self.num_hits += 1
        self._resident.move_to_end(key)
        resident.refcount += 1
        return resident

    def release(self, key: str) -> None:
        resident = self._resident.get(key)
        if resident is None or resident.refcount <= 0:
            raise RuntimeError(f"release of {key} without a matching acquire")
        resident.refcount -= 1

    def _admit(self, key: str, weights: AdapterWeights) -> Resident:
        pages = self._allocate(weights.rank, key)
        self._clear(pages, weights)
        num_modules = len(self._names)
        ranks = torch.zeros(num_modules, dtype=torch.int32)
        scales = torch.zeros(num_modules, dtype=torch.float32)
        first = pages[0] if pages else 0
        contiguous = pages == tuple(range(first, first + len(pages)))
        rows = None if contiguous else torch.tensor(pages, dtype=torch.long, device=self._device)
        for name, module in weights.modules.items():
            index = self._backbone.linears[name].index
            rank = module.a.shape[0]
            a_pool, b_pool = self._pools[index]
            if rows is None:  # the usual case: plain slice copies, no index tensors
                a_pool[first : first + rank].copy_(module.a, non_blocking=True)
                b_pool[first : first + rank].copy_(module.b.t(), non_blocking=True)
            else:
                a_pool.index_copy_(0, rows[:rank], module.a.to(self._device, self._dtype))
                b_pool.index_copy_(0, rows[:rank], module.b.t().to(self._device, self._dtype))
            ranks[index] = rank
            scales[index] = module.scale
        head = Head(
            pooling=weights.head.pooling,
            weight=weights.head.weight.to(self._device, self._dtype),
            bias=weights.head.bias.to(self._device, self._dtype),
        )
        resident = Resident(
            key=key,
            pages=pages,
            rank_by_module=ranks,
            scale_by_module=scales,
            head=head,
            num_bytes=weights.num_bytes,
        )
        self._resident[key] = resident
        self.num_loads += 1
        return resident

    def _clear(self, pages: tuple[int, ...], weights: AdapterWeights) -> None:
        """Zero the new adapter's pages wherever it leaves them untouched (modules it skips,
        or targets at a lower rank) and an earlier adapter left values there: such rows must
        add nothing. Tracking which pages hold values keeps page-in cheap for adapters that
        target few modules."""
        for index, name in enumerate(self._names):
            module = weights.modules.get(name)
            written = set(pages[: module.a.shape[0]]) if module is not None else set()
            stale = (set(pages) - written) & self._dirty[index]
            if stale:
                rows = torch.tensor(sorted(stale), dtype=torch.long, device=self._device)
                a_pool, b_pool = self._pools[index]
                a_pool.index_fill_(0, rows, 0.0)
                b_pool.index_fill_(0, rows, 0.0)
                self._dirty[index] -= stale
            self._dirty[index] |= written

    def _new_pool(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One module's A and B^T pools, preallocated so that page-in never allocates."""
        wrapper = self._backbone.linears[name]
        rows = self.num_pages + 1  # + the zero page
        return (
            torch.zeros((rows, wrapper.in_features), device=self._device, dtype=self._dtype),
            torch.zeros((rows, wrapper.out_features), device=self._device, dtype=self._dtype),
        )

    @property
    def pool_bytes(self) -> int:
        """Device bytes the pools take, fixed at construction."""
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self._pools
        )

    def _allocate(self, count: int, key: str) -> tuple[int, ...]:
        if count > self.num_pages:
            raise EngineOverloaded(
                f"{key} needs {count} pages but the adapter pool holds {self.num_pages}"
            )
        while self._free.count < count:
            if not self._evict_one():
                raise EngineOverloaded(
                    f"adapter pool full: every resident adapter is in use "
                    f"({key} needs {count} pages)"
                )
        return self._free.take(count)

    def _evict_one(self) -> bool:
        for key, resident in self._resident.items():  # oldest first
            if resident.refcount == 0:
                del self._resident[key]
                self._free.give(resident.pages)
                self.num_evictions += 1
                log.debug("evicted adapter %s", key)
                return True
        return False


class FreePages:
    """Free pool rows as maximal runs, so that allocation finds a contiguous run (which the
    kernels read as a view) in time proportional to the number of runs, not of pages."""

    def __init__(self, first: int, count: int) -> None:
        self._runs: dict[int, int] = {first: count}  # run start -> length
        self._ends: dict[int, int] = {first + count: first}  # run end (exclusive) -> start
        self.count = count

    def take(self, count: int) -> tuple[int, ...]:
        """``count`` pages: the lowest run that holds them all, else pieces of several runs."""
        if count > self.count:
            raise ValueError(f"{count} pages asked, {self.count} free")
        fits = [start for start, length in self._runs.items() if length >= count]
        if fits:
            start = min(fits)
            self._cut(start, count)
            return tuple(range(start, start + count))
        pages: list[int] = []
        for start in sorted(self._runs):
            piece = min(self._runs[start], count - len(pages))
            self._cut(start, piece)
            pages.extend(range(start, start + piece))
            if len(pages) == count:
                break
        return tuple(pages)

    def give(self, pages: tuple[int, ...]) -> None:
        """Return pages, merging them with neighbouring free runs."""
        for page in sorted(pages):
            start, length = page, 1
            if page in self._ends:  # a run ends right before: extend it
                start = self._ends.pop(page)
                length = self._runs.pop(start) + 1
            after = self._runs.pop(page + 1, None)
            if after is not None:
                del self._ends[page + 1 + after]
                length += after
            self._runs[start] = length
            self._ends[start + length] = start
            self.count += 1

    def _cut(self, start: int, count: int) -> None:
        """Take the first ``count`` pages of the run at ``start``."""
        length = self._runs.pop(start)
        del self._ends[start + length]
        self.count -= count
        if length > count:
            self._runs[start + count] = length - count
            self._ends[start + length] = start + count
