"""Multi-model requests: every requested model answers every input.

Head-only models (no LoRA weights) read the bare backbone, so they share one backbone row
per input: its pooled outputs feed all of their heads after the step (``engine.heads``). LoRA
models change the backbone's activations and run as rows of their own in the same mixed
batches. Five head-only models and two LoRA models thus cost three rows per input, and a
text whose pooled outputs the tenant's embedding cache holds costs the head-only models none.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.adapter_store import adapter_key
from engine.adapters import AdapterWeights, Head
from engine.embedding_cache import EmbeddingCache, EmbeddingKey, tokens_sha256
from engine.errors import AdapterIncompatible, InputError, ModelNotFound
from engine.heads import group_heads
from engine.inputs import Tokenized
from engine.job import ModelPrediction, ModelVersion, MultiJob
from engine.runner import BACKBONE_KEY, Pooled, RowOutput
from registry import AdapterRecord, shown
from scheduler import Row


def check_rank_fits(record: AdapterRecord, adapter_pages: int) -> None:
    """Refuse a model whose LoRA rank the adapter pool could never hold."""
    if record.rank > adapter_pages:
        raise AdapterIncompatible(
            f"{record.full_name}@{record.version} has rank {record.rank}; this engine's "
            f"adapter pool holds {adapter_pages} pages"
        )


def resolve_models(
    models: Sequence[str],
    resolve: Callable[[str], AdapterRecord],
    *,
    max_models: int,
    adapter_pages: int,
) -> list[AdapterRecord]:
    """Resolve every model before any work starts, so one bad name costs the others nothing.

    Raises InputError naming ``models`` or ``models[i]`` (wrong type, too many, a model
    listed twice, even under two spellings), ModelNotFound naming the model and its
    position, AdapterIncompatible.
    """
    if isinstance(models, str) or not isinstance(models, Sequence):
        raise InputError("models must be a list of model names", "models")
    if not models:
        raise InputError("models is empty: give at least one model", "models")
    if len(models) > max_models:
        raise InputError(
            f"models has {len(models)} names; at most {max_models} per request", "models"
        )
    records: list[AdapterRecord] = []
    seen: dict[str, int] = {}
    for i, model in enumerate(models):
        if not isinstance(model, str) or not model.strip():
            raise InputError(f"models[{i}] must be a non-empty model name", f"models[{i}]")
        try:
            record = resolve(model)
        except ModelNotFound as exc:
            raise ModelNotFound(f"{exc} (models[{i}])") from exc
        key = adapter_key(record)
        if key in seen:
            raise InputError(
                f"models[{i}] ({shown(model)}) is {key}, already listed as models[{seen[key]}]; "
                "list each model once",
                f"models[{i}]",
            )
        check_rank_fits(record, adapter_pages)
        seen[key] = i
        records.append(record)
    return records


def rows_per_text(records: Sequence[AdapterRecord]) -> int:
    """Rows one input costs at most: one per LoRA model, one shared by all head-only models."""
    num_lora = sum(1 for r in records if r.rank > 0)
    return num_lora + (1 if num_lora < len(records) else 0)


@dataclass(frozen=True, slots=True)
class ModelSlot:
    """One requested model, resolved and pinned in the host tier."""

    version: ModelVersion
    labels: tuple[str, ...]
    key: str  # adapter key ("tenant/name@version")
    num_pages: int  # LoRA rank (pool pages its rows take); 0 = head-only, no rows of its own
    head: Head  # the host tier's copy: applied after the step when the model is head-only


def model_slots(
    records: Sequence[AdapterRecord], keys: Sequence[str], weights: Callable[[str], AdapterWeights]
) -> list[ModelSlot]:
    """Slots for pinned models; whether a model is head-only comes from its parsed weights
    (what the step would run), not from its manifest."""
    slots = []
    for record, key in zip(records, keys, strict=True):
        parsed = weights(key)
        slots.append(
            ModelSlot(
                version=ModelVersion(record.full_name, record.version),
                labels=tuple(record.labels),
                key=key,
                num_pages=parsed.rank,
                head=parsed.head,
            )
        )
    return slots


class MultiPending:
    """A multi-model request in flight: its rows, its cache use, and how answers assemble."""

    def __init__(
        self,
        job: MultiJob,
        tokens: Tokenized,
        slots: Sequence[ModelSlot],
        cache: EmbeddingCache,
        *,
        tenant: str,
        backbone_sha256: str,
        cache_generation: int | None = None,
    ) -> None:
        self.job = job
        self.tokens = tokens
        self.keys = tuple(slot.key for slot in slots)
        self._slots = tuple(slots)
        self._lora_slot = {s.key: i for i, s in enumerate(slots) if s.num_pages > 0}
        self._heads = group_heads({i: s.head for i, s in enumerate(slots) if not s.num_pages})
        self._poolings = tuple(group.pooling for group in self._heads)
        self._cache = cache
        # the cache's generation when the request was resolved (default: now); a clear since,
        # a deletion while it tokenized, waited for an adapter or ran, and it remembers nothing
        self._cache_generation = cache.generation if cache_generation is None else cache_generation
        self._tenant = tenant  # whose cache entries these are
        self._backbone_sha256 = backbone_sha256
        self._is_cached = bool(self._heads) and cache.is_enabled
        self._token_hashes = [tokens_sha256(ids) for ids in tokens.ids] if self._is_cached else []
        self._needs_backbone_row = [bool(self._heads)] * len(tokens.ids)

    def serve_cached(self) -> None:
        """Answer the head-only models of every input whose pooled outputs are cached."""
        if not self._is_cached or self._cache.generation != self._cache_generation:
            return  # cleared since it resolved: what is there now is not this request's
        hits: list[int] = []
        found: list[list[np.ndarray]] = []
        for index in range(len(self.tokens.ids)):
            vectors = self._cache.get_all([self._cache_key(index, p) for p in self._poolings])
            if vectors is not None:
                hits.append(index)
                found.append(vectors)
                self._needs_backbone_row[index] = False
        if hits:
            stacked = {p: np.stack([v[k] for v in found]) for k, p in enumerate(self._poolings)}
            self._answer_heads(hits, stacked)

    def rows(self, arrival_s: float, deadline_s: float | None) -> list[Row]:
        """The rows to queue: each LoRA model's, plus one bare-backbone row per uncached input."""
        rows = []
        lora_parts = [(s.key, s.num_pages) for s in self._slots if s.num_pages > 0]
        for index, ids in enumerate(self.tokens.ids):
            parts = lora_parts + ([(BACKBONE_KEY, 0)] if self._needs_backbone_row[index] else [])
            rows.extend(
                Row(
                    request_id=self.job.request_id,
                    index=index,
                    tenant=self._tenant,
                    adapter_key=key,
                    num_tokens=len(ids),
                    arrival_s=arrival_s,
                    num_pages=num_pages,
                    deadline_s=deadline_s,
                )
                for key, num_pages in parts
            )
        return rows

    def deliver(self, rows: Sequence[Row], outputs: Sequence[RowOutput]) -> None:
        """LoRA rows answer their model; backbone rows answer every head-only model at once."""
        pooled: list[tuple[int, Pooled]] = []
        for row, output in zip(rows, outputs, strict=True):
            if isinstance(output, Pooled):
                pooled.append((row.index, output))
            else:
                self._answer(row.index, self._lora_slot[row.adapter_key], output)
        if not pooled:
            return
        indices = [index for index, _ in pooled]
        stacked = {p: np.stack([out.vectors[p] for _, out in pooled]) for p in self._poolings}
        self._remember(indices, stacked)
        self._answer_heads(indices, stacked)

    def _answer_heads(self, indices: Sequence[int], pooled: dict[str, np.ndarray]) -> None:
        for group in self._heads:
            for slot, probs in group.probs(pooled[group.pooling]):
                for row, index in enumerate(indices):
                    self._answer(index, slot, probs[row])

    def _answer(self, index: int, slot: int, probs: np.ndarray) -> None:
        model = self._slots[slot]
        labels = model.labels
        self.job.deliver_result(
            index,
            slot,
            ModelPrediction(
                model=model.version.model,
                version=model.version.version,
                label=labels[int(probs.argmax())],
                scores=dict(zip(labels, probs.tolist(), strict=True)),
            ),
        )

    def _remember(self, indices: Sequence[int], pooled: dict[str, np.ndarray]) -> None:
        if not self._is_cached or self._cache.generation != self._cache_generation:
            return
        for row, index in enumerate(indices):
            for pooling in self._poolings:
                self._cache.put(self._cache_key(index, pooling), pooled[pooling][row])

    def _cache_key(self, index: int, pooling: str) -> EmbeddingKey:
        return EmbeddingKey(
            tenant=self._tenant,
            backbone_sha256=self._backbone_sha256,
            pooling=pooling,
            tokens_sha256=self._token_hashes[index],
        )


def multi_request(
    request_id: int,
    slots: Sequence[ModelSlot],
    tokens: Tokenized,
    cache: EmbeddingCache,
    *,
    tenant: str,
    backbone_sha256: str,
    on_finish: Callable[[MultiJob], None],
    cache_generation: int | None = None,
) -> tuple[MultiJob, "MultiPending"]:
    """An admitted multi-model request's job, and its pending entry for the step loop."""
    job = MultiJob(
        request_id,
        [slot.version for slot in slots],
        tokens.truncated,
        [len(ids) for ids in tokens.ids],
        on_finish=on_finish,
    )
    pending = MultiPending(
        job,
        tokens,
        slots,
        cache,
        tenant=tenant,
        backbone_sha256=backbone_sha256,
        cache_generation=cache_generation,
    )
    return job, pending
