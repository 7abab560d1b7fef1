"""Adapter memory: LoRA rows in one page pool, heads alongside, LRU over idle adapters.

A page is one row of a single preallocated tensor (the slab): for every wrapped module, one
rank-row of its A (width ``in``) and the matching row of B transposed (width ``out``), side by
side. Each module's pools are column views of the slab, so kernels see per-module pools with
a row stride; a rank-r adapter takes r pages, and paging it in is one copy of r whole rows
(S-LoRA's unified pool). Ranks 4..64 share the slab without padding to the largest. Page 0 is
reserved and stays zero: kernels pad page lists with it, and it adds nothing.
"""

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from engine.adapters import AdapterWeights, Head, PackedModules, ranks_and_scales
from engine.backbone import Backbone
from engine.errors import EngineOverloaded

log = logging.getLogger(__name__)

# pack whole pool rows unless they would take more than this many times the adapter's bytes
_MAX_ROW_WASTE = 2
_MIN_HEAD_BYTES = 64 << 20


@dataclass(slots=True)
class Resident:
    """An adapter whose weights sit in the pools; mutable bookkeeping owned by AdapterMemory."""

    key: str  # "tenant/name@version"
    pages: tuple[int, ...]  # pool rows, len == rank
    rank_by_module: torch.Tensor  # int32 [M], 0 where the adapter has no LoRA
    scale_by_module: torch.Tensor  # float32 [M]
    head: Head  # on the engine's device
    num_bytes: int  # device bytes it holds: its pages, whole, and its head
    head_bytes: int
    refcount: int = 0  # requests holding it; never evicted while > 0
    forgotten: bool = False  # its version was deleted: freed at its last release
    # pages and scales as numpy arrays, made once: a static step copies them for every
    # segment, where converting the tuple and the tensor each time was most of its Python
    page_array: np.ndarray = field(init=False)
    scale_array: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.page_array = np.asarray(self.pages, dtype=np.int64)
        self.scale_array = self.scale_by_module.detach().cpu().numpy().astype(np.float32)


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
        self._columns, self.width = _layout(backbone)
        # preallocated once, with the zero page: page-in never allocates device memory
        self._slab = torch.zeros((num_pages + 1, self.width), device=device, dtype=dtype)
        self._pools = [
            (self._slab[:, a : a + n_in], self._slab[:, b : b + n_out])
            for a, n_in, b, n_out in self._columns
        ]
        self._free = FreePages(1, num_pages)
        self._resident: OrderedDict[str, Resident] = OrderedDict()
        self._resident_bytes = 0  # sum of their num_bytes
        # heads sit beside the pool, up to as many bytes again (at least _MIN_HEAD_BYTES, so
        # a small pool still takes two-layer heads: 2.25 MiB each on BERT-base): without a
        # bound, head-only models (no pages) stayed on the device for good
        self.max_head_bytes = max(self.pool_bytes, _MIN_HEAD_BYTES)
        self._head_bytes = 0
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
        # kept as a count: stats() reads it on the event loop while the model thread admits
        # and evicts, and iterating _resident there raised "mutated during iteration"
        return self._resident_bytes

    def resident_keys(self) -> list[str]:
        return list(self._resident)

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
        if resident.refcount == 0 and resident.forgotten:
            self._drop(key)

    def forget(self, keys: Iterable[str]) -> None:
        """Free deleted versions' pages, zeroed, now; or at their last release while a step
        holds them. Model thread only, as every change to the pool."""
        for key in keys:
            resident = self._resident.get(key)
            if resident is None:
                continue
            resident.forgotten = True
            if resident.refcount == 0:
                self._drop(key)

    def _drop(self, key: str) -> None:
        """Take ``key`` out of the pool (refcount 0); a forgotten one's rows are zeroed."""
        resident = self._resident.pop(key)
        self._resident_bytes -= resident.num_bytes
        self._head_bytes -= resident.head_bytes
        if resident.forgotten and resident.pages:
            index = torch.tensor(resident.pages, dtype=torch.long, device=self._device)
            self._slab.index_fill_(0, index, 0)
        self._free.give(resident.pages)

    def pack(
        self, weights: AdapterWeights, *, pin: bool = False, whole_rows: bool | None = None
    ) -> AdapterWeights:
        """``weights`` as views of one host buffer in the pool dtype, page-locked with ``pin``
        (CUDA only), laid out for a cheap page-in.

        An adapter whose modules fill most of a pool row gets ``rows``: its LoRA rows as whole
        pool rows, zero where it skips a module or targets it at a lower rank, so a page-in is
        one copy that also overwrites whatever an evicted adapter left on those pages. A sparse
        one (say query and value only: a fifth of a MiniLM row) stays compact, B stored
        transposed, and pages in module by module: whole rows would multiply its host bytes.
        ``whole_rows`` forces one layout or the other (None: by how much of a row it fills).
        Called on loader threads, off the model thread: it reads only the fixed layout.
        """
        head = weights.head
        compact = sum(m.a.numel() + m.b.numel() for m in weights.modules.values())
        dense = weights.rank * self.width <= _MAX_ROW_WASTE * compact
        dense = dense if whole_rows is None else whole_rows
        lora = weights.rank * self.width if dense else compact
        head_tensors = head.tensors()
        # every element is written below (zeros only where whole rows have gaps): no memset
        buffer = torch.empty(
            lora + sum(t.numel() for t in head_tensors), dtype=self._dtype, pin_memory=pin
        )
        head_views, offset = [], lora
        for tensor in head_tensors:  # the head after the LoRA rows, tensor after tensor
            view = buffer[offset : offset + tensor.numel()].view(tensor.shape)
            view.copy_(tensor)
            head_views.append(view)
            offset += tensor.numel()
        rows = buffer[:lora].view(weights.rank, self.width) if dense else None
        copied = rows is not None and self._concatenate(weights, rows)
        spans, offset = {}, 0
        for name, module in weights.modules.items():
            a0, n_in, b0, n_out = self._columns[self._backbone.linears[name].index]
            r = module.a.shape[0]
            if rows is not None:  # A and B transposed as column blocks of the whole rows
                span = (r, module.scale, a0, self.width, n_in, b0, self.width, n_out)
            else:  # compact: A, then B transposed, module after module
                span = (r, module.scale, offset, n_in, n_in, offset + r * n_in, n_out, n_out)
                offset += r * (n_in + n_out)
            spans[name] = span
        modules = PackedModules(buffer, spans)
        if not copied:
            if rows is not None:  # skipped modules and lower ranks leave zeros in whole rows
                rows.zero_()
            modules.fill(weights.modules)
        return AdapterWeights(
            modules=modules,
            head=head.with_tensors(head_views),
            labels=weights.labels,
            rank=weights.rank,
            rows=rows,
        )

    def _concatenate(self, weights: AdapterWeights, rows: torch.Tensor) -> bool:
        """Fill ``rows`` with one ``torch.cat`` over every module's A and B transposed (zeros for
        modules the adapter skips): one op instead of two copies per module, the usual case
        of adapters trained on every Linear, stored in any float dtype (``cat`` converts to the
        pool's). False, with nothing written, when a module has a lower rank than the adapter:
        the caller copies then."""
        rank, pieces = weights.rank, []
        for name, (_, n_in, _, n_out) in zip(self._names, self._columns, strict=True):
            module = weights.modules.get(name)
            if module is None:
                pieces.append(torch.zeros((), dtype=self._dtype).expand(rank, n_in + n_out))
            elif module.a.shape[0] != rank:
                return False
            else:
                pieces += (module.a, module.b.t())
        torch.cat(pieces, dim=1, out=rows)
        return True

    def _admit(self, key: str, weights: AdapterWeights) -> Resident:
        rows = weights.rows
        if rows is not None and (rows.shape[1] != self.width or rows.dtype != self._dtype):
            rows = None  # packed for another pool: copy module by module
        item_bytes = self._slab.element_size()
        head_bytes = sum(t.numel() for t in weights.head.tensors()) * item_bytes
        pages = self._allocate(weights.rank, head_bytes, key)
        if pages:
            first = pages[0]
            contiguous = pages == tuple(range(first, first + len(pages)))
            if rows is None and not contiguous:  # rare: whole rows built here, then one copy
                rows = self.pack(weights, whole_rows=True).rows
            if rows is None:
                self._slab[first : first + len(pages)].zero_()
                for name, module in weights.modules.items():
                    a_pool, b_pool = self._pools[self._backbone.linears[name].index]
                    r = module.a.shape[0]
                    a_pool[first : first + r].copy_(module.a, non_blocking=True)
                    b_pool[first : first + r].copy_(module.b.t(), non_blocking=True)
            elif contiguous:  # the usual case: one copy
                self._slab[first : first + len(pages)].copy_(rows, non_blocking=True)
            else:
                index = torch.tensor(pages, dtype=torch.long, device=self._device)
                self._slab.index_copy_(0, index, rows.to(self._device, non_blocking=True))
        # filled as lists, then one tensor each: 72 element stores into tensors were 0.19 ms of
        # Python a page-in on the model thread (36 modules), a third of one on an H200
        ranks_list, scales_list = [0] * len(self._names), [0.0] * len(self._names)
        linears = self._backbone.linears
        for name, rank, scale in ranks_and_scales(weights.modules):
            index = linears[name].index
            ranks_list[index] = rank
            scales_list[index] = scale
        ranks = torch.tensor(ranks_list, dtype=torch.int32)
        scales = torch.tensor(scales_list, dtype=torch.float32)
        head = weights.head.with_tensors(
            [t.to(self._device, self._dtype, non_blocking=True) for t in weights.head.tensors()]
        )
        resident = Resident(
            key=key,
            pages=pages,
            rank_by_module=ranks,
            scale_by_module=scales,
            head=head,
            num_bytes=len(pages) * self.width * item_bytes + head_bytes,
            head_bytes=head_bytes,
        )
        self._resident[key] = resident
        self._resident_bytes += resident.num_bytes
        self._head_bytes += head_bytes
        self.num_loads += 1
        return resident

    @property
    def pool_bytes(self) -> int:
        """Device bytes the pool takes, fixed at construction."""
        return self._slab.numel() * self._slab.element_size()

    def _allocate(self, count: int, head_bytes: int, key: str) -> tuple[int, ...]:
        """``count`` pages, and room for a head of ``head_bytes`` where idle adapters can
        make it, evicting them least recently used first."""
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
        # the heads' budget is soft: idle adapters go first, but a step the planner formed
        # (it budgets pages, not heads) never fails for it
        while self._head_bytes + head_bytes > self.max_head_bytes and self._evict_one():
            pass
        return self._free.take(count)

    def _evict_one(self) -> bool:
        for key, resident in self._resident.items():  # oldest first
            if resident.refcount == 0:
                self._drop(key)
                self.num_evictions += 1
                log.debug("evicted adapter %s", key)
                return True
        return False


def page_bytes(model_dir: str | Path, dtype: torch.dtype) -> int:
    """Bytes of one pool page (one rank-row of every wrapped Linear's A and B^T) for the
    encoder in ``model_dir``, read from its structure alone: the model is built on the meta
    device, so no weight is loaded. Every ``nn.Linear`` is wrapped (engine.backbone), so a
    row is their in + out features summed, as ``_layout`` lays it out."""
    from transformers import AutoConfig, AutoModel

    if not (Path(model_dir) / "config.json").is_file():  # as load_backbone says it
        raise ValueError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    width = sum(m.in_features + m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    return width * torch.empty((), dtype=dtype).element_size()


def backbone_page_bytes(backbone: Backbone, dtype: torch.dtype) -> int:
    """Bytes of one pool page for a loaded backbone (``page_bytes`` without loading it)."""
    return _layout(backbone)[1] * torch.empty((), dtype=dtype).element_size()


def pages_for_bytes(num_bytes: int, model_dir: str | Path, dtype: torch.dtype) -> int:
    """How many pages ``num_bytes`` of pool hold (ValueError when not even one)."""
    per_page = page_bytes(model_dir, dtype)
    if num_bytes < per_page:
        raise ValueError(
            f"adapter_pool_bytes={num_bytes} holds no page: one page of this backbone is "
            f"{per_page} bytes in {str(dtype).removeprefix('torch.')} (a rank-8 adapter "
            f"takes 8 pages, {8 * per_page} bytes)"
        )
    return num_bytes // per_page


def _layout(backbone: Backbone) -> tuple[tuple[tuple[int, int, int, int], ...], int]:
    """Per wrapped module (in index order): (A column, in, B column, out) in a pool row; and
    the row's width."""
    columns, width = [], 0
    for name in backbone.linear_names:
        wrapper = backbone.linears[name]
        columns.append(
            (width, wrapper.in_features, width + wrapper.in_features, wrapper.out_features)
        )
        width += wrapper.in_features + wrapper.out_features
    return tuple(columns), width


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
