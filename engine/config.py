"""The engine's one frozen configuration, built at the edge (CLI or embedding caller)."""

import math
import os
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

import torch

from engine.quantize import check_quantize

LORA_KERNELS = ("auto", "loop", "gather", "triton", "triton-fused")
DEFAULT_INTERLUDE_TOKENS = 256  # on the CPU
DEFAULT_CONTENDED_TOKENS = 512  # on the CPU
DEFAULT_CUDA_LOOKAHEAD_ROWS = 64
DEFAULT_HOST_CACHE_BYTES = 2 << 30
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class EngineConfig:
    registry_dir: str | Path = "graft-registry"  # SQLite catalog + adapter blobs
    backbone_dir: str | Path | None = None  # Hugging Face encoder directory; None = packaged MiniLM
    backbone_sha256: str | None = None  # pin: refuse to start on other weights
    device: str = "cpu"  # "cpu" or "cuda[:n]"
    dtype: str = "float32"  # backbone and adapter pool precision
    # "int8": the backbone's frozen Linear weights in int8 on the CPU (engine/quantize.py);
    # LoRA, heads, embeddings and norms stay in dtype
    quantize: str = "none"
    max_batch_tokens: int = 8192  # tokens per step: padded, or real where steps run packed
    max_batch_rows: int = 128  # rows per step
    max_inputs_per_request: int = 256  # texts in one classify call
    max_models_per_request: int = 16  # models in one classify_many call
    max_input_tokens: int | None = None  # cap below the backbone's own limit
    # rank-rows the device pool holds (a rank-8 adapter takes 8); None: 1024 on the CPU, and on
    # CUDA what adapter_memory_fraction of the device holds (the engine resolves it at start)
    adapter_pages: int | None = None
    # the device pool in bytes instead: when set, the engine derives adapter_pages from it (a
    # page is one rank-row of every Linear's A and B^T: 165 KiB for MiniLM in float32)
    adapter_pool_bytes: int | None = None
    # the default pool's share of a CUDA device's memory (LoRAX reserves the same tenth): 1,024
    # pages held 128 rank-8 adapters, a fleet of 1,000 then paged on every pass
    adapter_memory_fraction: float = 0.1
    # parsed adapters kept in host memory (LRU); None = 2 GiB, or more where the device pool
    # is larger (see host_budget_bytes)
    host_cache_bytes: int | None = None
    embedding_cache_bytes: int = 64 << 20  # pooled backbone outputs for head-only models; 0 = off
    max_loads_in_flight: int = 4  # concurrent adapter loads from disk
    # torch intra-op threads of the model thread; None: every core on the CPU (see
    # intra_op_threads), torch's default on CUDA
    num_threads: int | None = None
    # step budget while several tenants are active; None = never shrink; "auto" = by device
    # (see contended_budget_tokens)
    contended_batch_tokens: int | Literal["auto"] | None = "auto"
    # rows of a tenant's queue a step looks through for ones that fit its budgets (length
    # ratio, tokens), past a head that does not; 0 = the head only; None = by device (see
    # lookahead_budget_rows)
    lookahead_rows: int | None = None
    # padded-token budget of a short step of other tenants run between two layers of a
    # longer step (engine/step_loop.py); 0 = never pause a step; None = by device (see
    # interlude_budget_tokens)
    interlude_tokens: int | None = None
    # CPU steps of at most this many real tokens run unpadded (one sequence, each row attending
    # to itself) when padding would be a fifth of the step or more; 0 = always pad. Through a
    # model's own forward (one masked attention call, engine/packing.py) at most 512
    pack_max_tokens: int = 8192
    # the backbone's forward in plain torch calls (engine/lean_encoder.py) where a load-time
    # check finds it computes what the model's own forward does; False = always the model's
    lean_forward: bool = True
    max_queued_rows: int = 8192  # rows waiting server-wide before new requests get 503
    tenant_max_queued_rows: int = 1024  # default per-tenant queue bound before 429
    tenant_max_tokens_per_step: int | None = None  # default per-tenant step budget
    max_timeout_s: float = 60.0  # cap on a request's own timeout
    settings_poll_s: float = 2.0  # how often tenant settings and deletions are re-read
    is_fair: bool = True  # deficit round robin over tenants; False = one FIFO (baseline)
    # plan the next step while one runs, and queue it behind it on the model thread, once as
    # many rows wait as the running step holds (engine/step_loop.py); None = on CUDA (see
    # uses_plan_ahead)
    plan_ahead: bool | None = None
    # auto (loop/Triton on CUDA, loop/gather on CPU), loop, gather, triton, triton-fused
    lora_kernel: str = "auto"
    # steps of bucketed shapes (up to max_batch_tokens padded tokens) captured in CUDA graphs
    # and replayed (engine/static_step.py); None = on CUDA, where a step is bound by the host
    # (see uses_cuda_graphs); True off CUDA is an error
    cuda_graphs: bool | None = None
    # after start-up, freeze every live object out of the cycle collector's passes (gc.freeze;
    # engine/collector.py): a full pass then takes ms, not a quarter second. Process-wide:
    # False for applications that manage gc themselves
    gc_freeze: bool = True
    # the interpreter's thread switch interval while the engine runs (sys.setswitchinterval),
    # process-wide like gc_freeze: how long a thread that gave the interpreter lock up (for a
    # torch op, a read) may wait to take it back while another runs Python. Loader threads
    # give it up dozens of times a load: beside a thread running Python, at Python's 5 ms, a
    # load took 136-155 ms where 0.5 ms gave 10-18 ms (benchmarks/RESULTS.md). None = leave it
    switch_interval_ms: float | None = 0.5

    def __post_init__(self) -> None:
        _check_types(self)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        check_quantize(self.quantize, self.device, self.dtype)
        for name in (
            "max_batch_tokens",
            "max_batch_rows",
            "max_inputs_per_request",
            "max_models_per_request",
            "max_loads_in_flight",
            "max_queued_rows",
            "tenant_max_queued_rows",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tenant_max_tokens_per_step is not None and self.tenant_max_tokens_per_step < 1:
            raise ValueError(
                f"tenant_max_tokens_per_step must be >= 1 or None, "
                f"got {self.tenant_max_tokens_per_step}"
            )
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(
                f"num_threads must be >= 1 or None (every core), got {self.num_threads}"
            )
        if self.switch_interval_ms is not None and not self.switch_interval_ms > 0:
            raise ValueError(f"switch_interval_ms must be > 0, got {self.switch_interval_ms}")
        if not self.settings_poll_s > 0:
            raise ValueError(f"settings_poll_s must be > 0, got {self.settings_poll_s}")
        if not self.max_timeout_s > 0:
            raise ValueError(f"max_timeout_s must be > 0, got {self.max_timeout_s}")
        contended = self.contended_batch_tokens
        if (
            contended != "auto"
            and contended is not None
            and (not isinstance(contended, int) or contended < 1)
        ):
            raise ValueError(
                f"contended_batch_tokens must be >= 1, None or 'auto', got {contended!r}"
            )
        if self.lookahead_rows is not None and self.lookahead_rows < 0:
            raise ValueError(f"lookahead_rows must be >= 0, got {self.lookahead_rows}")
        if self.interlude_tokens is not None and self.interlude_tokens < 0:
            raise ValueError(f"interlude_tokens must be >= 0, got {self.interlude_tokens}")
        if self.adapter_pages is not None and self.adapter_pages < 1:
            raise ValueError(f"adapter_pages must be >= 1 or None, got {self.adapter_pages}")
        if not 0 < self.adapter_memory_fraction <= 0.9:
            raise ValueError(
                f"adapter_memory_fraction must be in (0, 0.9], got {self.adapter_memory_fraction}"
            )
        if self.adapter_pool_bytes is not None and self.adapter_pool_bytes < 1:
            raise ValueError(f"adapter_pool_bytes must be >= 1, got {self.adapter_pool_bytes}")
        for name in ("host_cache_bytes", "embedding_cache_bytes", "pack_max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_input_tokens is not None and self.max_input_tokens < 3:
            raise ValueError(f"max_input_tokens must be >= 3, got {self.max_input_tokens}")
        if self.lora_kernel not in LORA_KERNELS:
            raise ValueError(f"lora_kernel must be one of {LORA_KERNELS}, got {self.lora_kernel!r}")
        if not (self.device == "cpu" or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise ValueError(f"cuda_graphs needs a CUDA device, got device={self.device!r}")

    @property
    def intra_op_threads(self) -> int | None:
        """``num_threads``, or on the CPU every core this process may use. On the 2-core VM
        two threads saturated 1.23-1.37x one thread's rate embedded and 1.36-1.54x over HTTP
        (1,000 tenants' SMS; benchmarks/RESULTS.md, "One OpenMP team"). That
        holds while the model thread owns the process's only OpenMP team: the engine's loaders
        run torch on one thread, and so should an embedding application's own threads. The
        cost: a cold load busy on one core holds up each parallel region of a step (~5 ms
        added to a warm request, against under 1 ms on one thread); cores - 1 avoids it.
        None: leave torch's default (CUDA)."""
        if self.num_threads is not None or self.device.startswith("cuda"):
            return self.num_threads
        return _usable_cores()

    def host_budget_bytes(self, pool_bytes: int) -> int:
        """``host_cache_bytes``, or by default 2 GiB and at least a quarter over the device
        pool: a request pins its adapter in the host tier, so an adapter the host dropped is
        read from disk again even while the device holds it. On an H200, 1,000 BERT-base
        adapters in a 5.4 GB pool behind the old fixed 2 GiB were re-read from disk, 34-334
        of them in each 2-second rate point of a load sweep (benchmarks/RESULTS.md)."""
        if self.host_cache_bytes is not None:
            return self.host_cache_bytes
        return max(DEFAULT_HOST_CACHE_BYTES, pool_bytes * 5 // 4)

    @property
    def uses_cuda_graphs(self) -> bool:
        """``cuda_graphs``, or its default for the device: on CUDA, where an eager step is
        bound by the host's device-op calls and a replayed graph is one call. On an H200, 1,000
        tenants' SMS on MiniLM saturated at 3,736 requests/s with graphs against 2,734 without,
        and a 32-row step took 2.1 against 5.2 ms (benchmarks/RESULTS.md, session 12)."""
        if self.cuda_graphs is not None:
            return self.cuda_graphs
        return self.device.startswith("cuda")

    @property
    def uses_plan_ahead(self) -> bool:
        """``plan_ahead``, or its default for the device: on CUDA, where the device idles while
        the event loop delivers a step and plans the next. On an H200 behind 4 front ends it
        served 6,578 requests/s in a closed loop against 4,752 without, and 3,200 against 2,300
        under a 50 ms p99 (benchmarks/RESULTS.md, session 28). On the CPU the model thread's
        own work fills the cycle, and sharing two cores with the delivery cost up to 6%
        (session 25)."""
        if self.plan_ahead is not None:
            return self.plan_ahead
        return self.device.startswith("cuda")

    @property
    def interlude_budget_tokens(self) -> int:
        """``interlude_tokens``, or its default for the device: 256 on the CPU, where a step's
        cost grows with its tokens, so a short step run inside a long one costs little; 0 on
        CUDA, where a small step is bound by the host (about 10 ms for one row on an H200,
        benchmarks/RESULTS.md), so each interlude would cost as much as a whole step."""
        if self.interlude_tokens is not None:
            return self.interlude_tokens
        return 0 if self.device.startswith("cuda") else DEFAULT_INTERLUDE_TOKENS

    @property
    def contended_budget_tokens(self) -> int | None:
        """``contended_batch_tokens``, or its default for the device: 512 on the CPU, where a
        step costs what its tokens cost, so a smaller step bounds a neighbour's wait; None
        (the full ``max_batch_tokens``) on CUDA, where a small step is bound by the host and
        costs about as much as a full one, so shrinking it only multiplies the steps: on an
        H200 1,000 tenants' SMS ran 1.4-2.6 rows a step under the 512 budget
        (benchmarks/RESULTS.md, "On a GPU")."""
        if self.contended_batch_tokens != "auto":
            return self.contended_batch_tokens
        return None if self.device.startswith("cuda") else DEFAULT_CONTENDED_TOKENS

    @property
    def lookahead_budget_rows(self) -> int:
        """``lookahead_rows``, or its default for the device: 64 on CUDA, where a step is
        bound by the host and more rows cost little, so a deep queue should fill it; 0 on the
        CPU, where a step costs what its padded tokens cost: there small steps of similar
        length (packed, unpadded, under 512 tokens) beat big padded ones, and one tenant's
        overload with lookahead made 36-53-row steps and halved its saturation rate
        (benchmarks/RESULTS.md, session 10)."""
        if self.lookahead_rows is not None:
            return self.lookahead_rows
        return DEFAULT_CUDA_LOOKAHEAD_ROWS if self.device.startswith("cuda") else 0

    @property
    def lookahead_max_tokens(self) -> int | None:
        """On the CPU a row found past its tenant's head joins a step only while the step's
        real tokens stay within ``pack_max_tokens`` (at start-up lowered to what the runner
        packs: 512 through a model's own forward): such a step runs unpadded, so rows of
        mixed lengths cost their own tokens. On CUDA no limit (steps are host-bound)."""
        if self.device.startswith("cuda") or self.pack_max_tokens == 0:
            return None
        return self.pack_max_tokens

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def _usable_cores() -> int:
    """Cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_types(config: EngineConfig) -> None:
    """Each number, flag and name of the type its field says: "8192" from a config file
    would fail later as a bare TypeError naming no field, and nan or 1.5 pass range checks."""
    hints = typing.get_type_hints(EngineConfig)
    for field in fields(config):
        value = getattr(config, field.name)
        allowed = typing.get_args(hints[field.name]) or (hints[field.name],)
        if value is None and types.NoneType in allowed:
            continue
        if any(typing.get_origin(a) is Literal and value in typing.get_args(a) for a in allowed):
            continue
        if bool in allowed:
            ok = isinstance(value, bool)
        elif float in allowed:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value)
        elif int in allowed:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif str in allowed:
            ok = isinstance(value, str | Path) if Path in allowed else isinstance(value, str)
        else:
            continue
        if not ok:
            expected = " or ".join(_describe(a) for a in allowed)
            raise ValueError(f"{field.name} must be {expected}, got {value!r}")


def _describe(kind: object) -> str:
    if typing.get_origin(kind) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(kind))
    names = {types.NoneType: "None", bool: "True or False", int: "an integer", str: "a string"}
    return {float: "a finite number", Path: "a path", **names}.get(kind, str(kind))
