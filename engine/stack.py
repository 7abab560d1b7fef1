"""What ``Engine.start`` loads: the backbone and everything built on it, as one unit.

Everything derived from the backbone's weights lives here and nowhere else, so loading
another backbone builds all of it afresh (the embedding cache included): nothing computed on
old weights can outlive them.
"""

import logging
import time
from dataclasses import dataclass

import torch

from engine.adapter_store import AdapterStore, check_pool_fits
from engine.backbone import Backbone, load_backbone
from engine.config import EngineConfig
from engine.embedding_cache import EmbeddingCache
from engine.host_cache import HostCache
from engine.lora_kernels import LoraKernel, kernel_for
from engine.memory import AdapterMemory, backbone_page_bytes
from engine.packing import check_padding_is_neutral
from engine.runner import ModelRunner
from engine.tenant_settings import TenantSettings
from registry import Registry
from scheduler import Scheduler

log = logging.getLogger(__name__)

CAPTURE_RANK = 8  # training's default rank: its shapes are captured even before any adapter


@dataclass(slots=True)
class ServingStack:
    """What start() loads; the engine holds None before, so nothing half-built is reachable."""

    backbone: Backbone
    registry: Registry
    memory: AdapterMemory
    host: HostCache  # parsed adapters; read by the event loop for head-only models' heads
    store: AdapterStore
    runner: ModelRunner
    settings: TenantSettings
    embeddings: EmbeddingCache  # pooled outputs of this backbone, per tenant (event loop only)

    def close(self) -> None:
        """Stop the loaders and close the registry (after the model thread stopped)."""
        self.store.close()
        self.registry.close()

    def stats(self) -> dict[str, int]:
        """The model thread's counters, the adapter tiers' and the embedding cache's."""
        runner = self.runner
        counts = {
            "steps": runner.num_steps,
            "packed_steps": runner.num_packed_steps,
            "static_steps": runner.num_static_steps,  # fixed shapes (CUDA graphs)
            "static_captures": runner.num_captures,
            "static_capture_us": round(runner.capture_seconds * 1e6),
            "rows": runner.num_rows,
        }
        counts.update(self.store.stats())
        counts.update(self.embeddings.stats())
        return counts


def load_stack(config: EngineConfig, scheduler: Scheduler) -> ServingStack:
    """Load and hash the backbone, open the registry, build the adapter tiers and the runner."""
    check_device(config.device)
    kernel = kernel_for(config.lora_kernel, config.device)  # refused before the backbone loads
    if config.intra_op_threads:
        torch.set_num_threads(config.intra_op_threads)
    if config.device.startswith("cuda"):
        use_device(config.device)
    backbone = load_backbone(
        config.backbone_dir,
        device=config.device,
        dtype=config.torch_dtype,
        expected_sha256=config.backbone_sha256,
        quantize=config.quantize,
    )
    check_padding_is_neutral(backbone, config.device, config.torch_dtype)
    registry = Registry(config.registry_dir)
    try:
        return _build(config, scheduler, backbone, registry, kernel)
    except BaseException:  # a pool too small, say: the failed start leaves no file open
        registry.close()
        raise


def _build(
    config: EngineConfig,
    scheduler: Scheduler,
    backbone: Backbone,
    registry: Registry,
    kernel: LoraKernel,
) -> ServingStack:
    registry.register_base(backbone.sha256, backbone.name)
    dependents = registry.dependents(backbone.sha256)
    page_bytes = backbone_page_bytes(backbone, config.torch_dtype)
    check_pool_fits(dependents, config.adapter_pages, page_bytes, config.adapter_pool_bytes)
    memory = AdapterMemory(backbone, config.adapter_pages, config.device, config.torch_dtype)
    log.info(
        "adapter pool: %d pages of %d bytes (%.1f MiB) on %s",
        config.adapter_pages,
        page_bytes,
        memory.pool_bytes / 2**20,
        config.device,
    )
    host = HostCache(_host_budget(config, memory.pool_bytes))
    store = AdapterStore(
        registry,
        backbone,
        memory,
        host,
        max_loads_in_flight=config.max_loads_in_flight,
        pin_host_memory=config.device.startswith("cuda"),
    )
    runner = ModelRunner(
        backbone,
        memory,
        config.device,
        kernel,
        pack_max_tokens=config.pack_max_tokens,
        step_max_tokens=config.max_batch_tokens,
        static_max_tokens=config.max_batch_tokens if config.uses_cuda_graphs else 0,
        cuda_graphs=config.uses_cuda_graphs,
        lean_forward=config.lean_forward,
    )
    log.info("backbone %s loaded (sha256 %s)", backbone.name, backbone.sha256[:12])
    scheduler.set_packing(runner.budgets_real_tokens, runner.pack_max_tokens)
    if config.uses_cuda_graphs:
        _capture_up_front(runner, {record.rank for record in dependents} | {CAPTURE_RANK})
    settings = TenantSettings(registry, scheduler, scheduler.default_policy)
    return ServingStack(
        backbone=backbone,
        registry=registry,
        memory=memory,
        host=host,
        store=store,
        runner=runner,
        settings=settings,
        embeddings=EmbeddingCache(config.embedding_cache_bytes),
    )


def _capture_up_front(runner: ModelRunner, ranks: set[int]) -> None:
    start = time.perf_counter()
    count = runner.capture_static(ranks)
    log.info(
        "captured %d CUDA graphs (LoRA ranks %s) in %.1f s",
        count,
        ",".join(map(str, sorted(ranks))),
        time.perf_counter() - start,
    )


def _host_budget(config: EngineConfig, pool_bytes: int) -> int:
    budget = config.host_budget_bytes(pool_bytes)
    if budget < pool_bytes:
        log.warning(
            "host_cache_bytes=%d is below the device pool's %d bytes: adapters the host tier "
            "drops are read from disk again even while the device holds them",
            budget,
            pool_bytes,
        )
    return budget


def check_device(device: str) -> None:
    """Refuse a CUDA device this process cannot use, by name, before loading anything onto
    it (torch itself fails deep in the first copy, with an AssertionError about its build)."""
    if not device.startswith("cuda"):
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = torch.device(device).index or 0
    if index < count:
        return
    build = "a CUDA build" if torch.backends.cuda.is_built() else "a CPU-only build"
    seen = f"{count} CUDA device(s)" if count else "no CUDA device"
    fix = f"pick an index below {count}" if count else "serve on device='cpu'"
    raise ValueError(
        f"device={device!r}, but this process sees {seen} (torch {torch.__version__}, {build}); "
        f"{fix}"
    )


def use_device(device: str) -> None:
    """Make ``device`` the current CUDA device of this thread, the model thread: the capture
    stream, graph replays and stream waits act on the current device, cuda:0 unless told."""
    index = torch.device(device).index
    if index is not None:
        torch.cuda.set_device(index)
