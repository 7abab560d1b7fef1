"""``GET /metrics``: the engine's counters and the HTTP edge's latencies for Prometheus.

The engine already counts everything worth watching (``Engine.stats``, ``tenant_stats``);
this module only names and types those counters at scrape time, so nothing is counted twice
and a scrape costs a dictionary walk. Each app gets its own ``CollectorRegistry``: two apps
in one process (tests, an embedding caller) never share or clash over series.
"""

import asyncio
import hmac
import time
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine import Engine
from server.errors import AUTHENTICATION, EXPECT_REFUSED, ApiError
from server.routes import ENGINE, bearer_key
from server.train_routes import TRAINING

COUNTER, GAUGE = "counter", "gauge"

# every key of Engine.stats(): (metric name without the graft_ prefix, kind, help). A key
# missing here fails a test rather than going out untyped.
ENGINE_METRICS: dict[str, tuple[str, str, str]] = {
    "waiting_rows": ("waiting_rows", GAUGE, "Inputs admitted and waiting for a step."),
    "requests_in_flight": ("requests_in_flight", GAUGE, "Requests admitted and not finished."),
    "steps": ("steps", COUNTER, "Batches run through the backbone."),
    "packed_steps": ("packed_steps", COUNTER, "Steps run unpadded as one packed sequence."),
    "static_steps": (
        "static_steps",
        COUNTER,
        "Steps run as fixed shapes, replayed from CUDA graphs (cuda_graphs on).",
    ),
    "static_captures": (
        "static_captures",
        COUNTER,
        "Step shapes captured in CUDA graphs, at start-up and on first use after.",
    ),
    "static_capture_us": (
        "static_capture_seconds",
        COUNTER,
        "Time spent capturing CUDA graphs; its growth while serving is time steps waited.",
    ),
    "rows": ("rows", COUNTER, "Inputs run through the backbone."),
    "interludes": ("interludes", COUNTER, "Short steps run between two layers of a longer one."),
    "planned_ahead": (
        "planned_ahead_steps",
        COUNTER,
        "Steps planned and queued while the step before them ran (EngineConfig.plan_ahead).",
    ),
    "step_busy_us": (
        "step_busy_seconds",
        COUNTER,
        "Time the model thread spent in steps; its rate is the thread's load (1: saturated).",
    ),
    "step_cpu_us": (
        "step_cpu_seconds",
        COUNTER,
        "The model thread's own CPU time in steps (not torch's intra-op workers, not the "
        "GPU's); well below step_busy_seconds, steps waited for the interpreter lock or a core.",
    ),
    "adapter_disk_loads": ("adapter_disk_loads", COUNTER, "Adapters read from the registry."),
    "adapter_disk_bytes_read": (
        "adapter_disk_read_bytes",
        COUNTER,
        "Bytes of adapter files read and verified.",
    ),
    "adapter_loads_in_flight": (
        "adapter_loads_in_flight",
        GAUGE,
        "Adapter loads queued or running.",
    ),
    "adapter_host_hits": ("adapter_host_hits", COUNTER, "Adapter lookups the host tier served."),
    "adapter_host_misses": ("adapter_host_misses", COUNTER, "Lookups that went to the disk."),
    "adapter_host_evictions": ("adapter_host_evictions", COUNTER, "Adapters dropped from host."),
    "adapter_host_entries": ("adapter_host_entries", GAUGE, "Adapters held in host memory."),
    "adapter_host_bytes": ("adapter_host_bytes", GAUGE, "Bytes of adapters in host memory."),
    "adapter_device_hits": ("adapter_device_hits", COUNTER, "Pins of an adapter already paged in."),
    "adapter_device_loads": ("adapter_device_loads", COUNTER, "Adapters paged into the pool."),
    "adapter_device_evictions": ("adapter_device_evictions", COUNTER, "Adapters paged out."),
    "adapter_device_resident": ("adapter_device_resident", GAUGE, "Adapters in the device pool."),
    "adapter_device_bytes": ("adapter_device_bytes", GAUGE, "Bytes of resident adapters."),
    "adapter_pages_free": ("adapter_pages_free", GAUGE, "Free rank-row pages in the pool."),
    "embedding_cache_hits": ("embedding_cache_hits", COUNTER, "Pooled outputs reused."),
    "embedding_cache_misses": ("embedding_cache_misses", COUNTER, "Pooled outputs computed."),
    "embedding_cache_evictions": ("embedding_cache_evictions", COUNTER, "Pooled outputs dropped."),
    "embedding_cache_entries": ("embedding_cache_entries", GAUGE, "Pooled outputs held."),
    "embedding_cache_bytes": ("embedding_cache_bytes", GAUGE, "Bytes of pooled outputs held."),
}

# to the metric's base unit
_SCALE = {"step_busy_us": 1e-6, "step_cpu_us": 1e-6, "static_capture_us": 1e-6}

# every key of Engine.tenant_stats()[tenant], all monotonic: graft_tenant_<key>_total
TENANT_HELP = {
    # a row is one input for one model: a multi-model request queues a row per input and
    # LoRA model, and one per input for its head-only models together
    "admitted_rows": "Rows admitted to the tenant's queue (an input, for one or more models).",
    "rejected_requests": "Requests refused with 429: the tenant's queue was full.",
    "overloaded_requests": "Requests refused with 503: the server's queues were full.",
    "expired_rows": "Rows whose deadline passed before they could start.",
    "aborted_rows": "Rows cancelled, or whose client went away, before they ran.",
    "run_rows": "Rows run through the backbone.",
    "run_tokens": "Tokens of the tenant's inputs run through the backbone.",
}

# from one cached short input to a long one waiting behind a queue
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineCollector(Collector):
    """Reads the engine's counters at each scrape; per tenant only with ``per_tenant``."""

    def __init__(self, engine: Engine, *, per_tenant: bool) -> None:
        self._engine = engine
        self._per_tenant = per_tenant

    def collect(self) -> Iterator[Metric]:
        engine = self._engine
        yield GaugeMetricFamily("graft_ready", "1 while the engine serves.", int(engine.ready))
        if engine.ready:
            config, backbone = engine.config, engine.backbone
            info = GaugeMetricFamily(
                "graft_engine_info",
                "The backbone and precision this engine serves.",
                labels=["backbone", "backbone_sha256", "device", "dtype", "quantize"],
            )
            info.add_metric(
                [backbone.name, backbone.sha256, config.device, config.dtype, config.quantize], 1
            )
            yield info
        for key, value in engine.stats().items():
            name, kind, doc = ENGINE_METRICS.get(key, (key, GAUGE, f"Engine.stats()[{key!r}]."))
            family = CounterMetricFamily if kind == COUNTER else GaugeMetricFamily
            yield family(f"graft_{name}", doc, value * _SCALE.get(key, 1))
        if self._per_tenant:
            yield from _tenant_families(engine.tenant_stats())


def _tenant_families(stats: dict[str, dict[str, int]]) -> Iterator[Metric]:
    for key, doc in TENANT_HELP.items():
        family = CounterMetricFamily(f"graft_tenant_{key}", doc, labels=["tenant"])
        for tenant, counts in sorted(stats.items()):
            family.add_metric([tenant], counts.get(key, 0))
        yield family


class TrainingCollector(Collector):
    """The app's training jobs by state, while its job manager runs."""

    def __init__(self, app: web.Application) -> None:
        self._app = app

    def collect(self) -> Iterator[Metric]:
        manager = self._app[TRAINING].manager
        yield GaugeMetricFamily(
            "graft_train_available",
            "1 while this server runs training jobs.",
            int(manager is not None and manager.is_running),  # else the routes answer 503
        )
        jobs = GaugeMetricFamily(
            "graft_train_jobs", "Training jobs this server knows, by state.", labels=["state"]
        )
        for state, count in (manager.state_counts() if manager is not None else {}).items():
            jobs.add_metric([state], count)
        yield jobs


class Metrics:
    """One app's registry: the engine's and training's counters, and the latency of every
    HTTP request."""

    def __init__(self, app: web.Application, key: str | None) -> None:
        self.key = key
        self.registry = CollectorRegistry(auto_describe=True)
        # tenants' names and traffic only behind a key: an open route would show them to
        # every caller, other tenants included
        self.registry.register(EngineCollector(app[ENGINE], per_tenant=key is not None))
        if TRAINING in app:
            self.registry.register(TrainingCollector(app))
        self.request_seconds = Histogram(
            "graft_http_request_duration_seconds",
            "Time in the app, from routing to the handler's answer (a stream's last line).",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._request_series: dict[tuple[str, str, int], Histogram] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """One request's duration. Each label set's series is looked up once: ``labels()``
        checks and joins the values on every call, half of what an observation cost."""
        key = (method, route, status)
        series = self._request_series.get(key)
        if series is None:  # labels are a bounded set: methods, routes and statuses
            series = self._request_series[key] = self.request_seconds.labels(
                method, route, str(status)
            )
        series.observe(seconds)


METRICS = web.AppKey("metrics", Metrics)
CLIENT_CLOSED = 499  # the status label of a request whose client left first (nginx's code)
# any other method a client sends is counted as "other": labels stay a bounded set
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def add_metrics(app: web.Application, key: str | None) -> None:
    """``GET /metrics`` and the state ``timing_middleware`` records into (the app must list
    that middleware). With ``key``, scrapes must send ``Authorization: Bearer <key>`` and get
    the per-tenant series too; without, the route is open and shows no tenant."""
    if key is not None and not key.strip():
        raise ValueError("metrics key must not be blank")
    app[METRICS] = state = Metrics(app, key)
    app[EXPECT_REFUSED] = lambda request, status: state.observe_request(
        _method(request), _route(request), status, 0.0
    )
    app.router.add_get("/metrics", metrics)


@web.middleware
async def timing_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Observe each request's duration; a no-op in an app without ``add_metrics``."""
    state = request.app.get(METRICS)
    if state is None:
        return await handler(request)
    started = time.perf_counter()
    status = 500  # anything else the error middleware let through
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        status = CLIENT_CLOSED  # the client went away: not a server error
        raise
    finally:
        state.observe_request(
            _method(request), _route(request), status, time.perf_counter() - started
        )


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _method(request: web.Request) -> str:
    return request.method if request.method in _METHODS else "other"


def _same_key(sent: str, key: str) -> bool:
    """A header's non-UTF-8 bytes arrive as lone surrogates: compared as those bytes, and a
    string no bytes make is no key (it failed to encode into a 500)."""
    try:
        sent_bytes = sent.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return hmac.compare_digest(sent_bytes, key.encode())


async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text exposition of this app's registry."""
    state = request.app[METRICS]
    if state.key is not None:
        sent = bearer_key(request)
        if sent is None or not _same_key(sent, state.key):
            raise ApiError(
                401,
                AUTHENTICATION,
                "metrics need 'Authorization: Bearer <metrics key>'",
                headers={"WWW-Authenticate": 'Bearer realm="graft-metrics"'},
            )
    return web.Response(
        body=generate_latest(state.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )
