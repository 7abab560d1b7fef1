"""The training worker: one spawned OS process per job, so training never blocks serving.

It loads the backbone and opens the registry itself, trains with `train_adapter`, and talks to
its `JobManager` over one pipe. Worker → manager messages are dicts: ``epoch`` (per epoch:
epoch, epochs, loss, val_macro_f1, eta_s), ``publish`` (asking leave to publish), then ``done``
or ``failed``. The manager answers ``publish`` with "go" or "stop": a cancel either lands before
anything is published or is refused, never in between. The manifest of the published version
names the job (``training_job``), so a worker that dies right after publishing is still found.
"""

import ctypes
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GO, STOP = "go", "stop"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


SCRATCH_DIR = "tmp"  # in the job's directory
MODEL_DIR = "model"  # a full-mode job's model, in its directory; staged as ".model-*"


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything a worker needs; pickled to the spawned process."""

    job_id: str
    tenant: str
    name: str
    data_path: Path  # the stored upload (.csv, .tsv or .jsonl)
    source: str  # the upload's name, as messages name it
    config: Any  # TrainConfig (typed loosely: the spawned side imports training lazily)
    promote: bool  # move the name's latest pointer to the new version
    # the job's tenant's stamp: a tenant deleted and made again since never gets the version
    tenant_created_at: float | None
    registry_dir: Path
    backbone_dir: Path | None  # None: the packaged backbone
    backbone_sha256: str | None  # the server's backbone: a job never trains on other weights
    num_threads: int  # torch intra-op threads; low, so serving keeps its cores
    output_dir: Path | None  # full mode: where the standalone model goes
    parent_pid: int  # the server process; the worker exits if it is gone


class PublishRefused(Exception):
    """The manager said "stop": the job was cancelled while training."""


def run_worker(spec: WorkerSpec, conn: Connection) -> None:
    """The spawned process's entry point: train, publish, report; never raises."""
    _die_with_parent(spec.parent_pid)
    # Ctrl-C at the server's terminal reaches its whole process group, workers too: the manager
    # decides, killing a training worker at shutdown and letting a publishing one finish
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # temporary files (the staged version: held-out texts, weights) go in the job's directory,
    # which the manager empties when the job ends; killed, the worker cleans up nothing
    scratch = spec.data_path.parent / SCRATCH_DIR
    scratch.mkdir(exist_ok=True)
    tempfile.tempdir = str(scratch)
    try:
        outcome = _train(spec, conn)
    except BaseException as exc:  # noqa: BLE001 - every failure is reported, then the process ends
        log.info("training job %s failed", spec.job_id, exc_info=True)
        _send(conn, {"type": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return
    _send(conn, {"type": "done", **outcome})


def _train(spec: WorkerSpec, conn: Connection) -> dict[str, Any]:
    import torch

    from engine import load_backbone
    from registry import Registry
    from training.data import load_examples
    from training.trainer import train_adapter

    torch.set_num_threads(spec.num_threads)
    # this process is its own edge: keep the tokenizer's thread pool off the server's cores too
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    backbone = load_backbone(spec.backbone_dir, expected_sha256=spec.backbone_sha256)
    examples = load_examples(spec.data_path)

    def on_event(info: dict[str, Any]) -> None:
        _send(conn, {"type": "epoch", **info})

    with Registry(spec.registry_dir) as registry:
        gated = None if spec.config.mode == "full" else _GatedRegistry(registry, conn, spec)
        extra = {"output_dir": spec.output_dir} if spec.config.mode == "full" else {}
        result = train_adapter(
            backbone,
            gated,  # type: ignore[arg-type]  # the part of Registry train_adapter uses
            spec.tenant,
            spec.name,
            examples,
            spec.config,
            source=spec.source,
            progress=False,
            on_event=on_event,
            **extra,
        )
    return {
        "version": None if result.record is None else result.record.version,
        "metrics": result.metrics,
        "epochs_run": result.epochs_run,
        "train_seconds": round(result.train_seconds, 3),
        "adapter_bytes": result.adapter_bytes,
    }


class _GatedRegistry:
    """What `train_adapter` uses of a Registry, with the job's rules around `publish`: ask the
    manager first, honour the job's `promote`, and tag the manifest with the job id."""

    def __init__(self, registry: Any, conn: Connection, spec: WorkerSpec) -> None:
        self._registry = registry
        self._conn = conn
        self._spec = spec

    def has_tenant(self, tenant: str) -> bool:
        return self._registry.has_tenant(tenant)

    def publish(self, tenant: str, name: str, source_dir: Path, manifest: Mapping[str, Any]):
        _send(self._conn, {"type": "publish"})
        if self._conn.recv() != GO:
            raise PublishRefused("the job was cancelled before publishing")
        tagged = {**manifest, "training_job": self._spec.job_id}
        return self._registry.publish(
            tenant,
            name,
            source_dir,
            tagged,
            promote=self._spec.promote,
            tenant_created_at=self._spec.tenant_created_at,
        )


def _send(conn: Connection, message: dict[str, Any]) -> None:
    try:
        conn.send(message)
    except (BrokenPipeError, EOFError, OSError):
        os._exit(1)  # the manager is gone; nobody is left to tell


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to kill this process when the server dies (Linux; elsewhere the manager's
    shutdown kills workers). A worker outliving its server could publish a job that the
    restarted server has already marked failed."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        log.warning("cannot tie the training worker's life to the server's")
    if os.getppid() != parent_pid:  # the server died before prctl took effect
        os._exit(1)
