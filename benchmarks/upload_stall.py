"""How long one tenant's training upload stalls everyone else's requests.

Starts ``graft serve`` as deployed (a child process, optionally with ``--workers`` front ends),
probes ``GET /health`` every few milliseconds, and meanwhile posts one large JSON lines upload
to ``POST /v1/train``. The server checks the upload before it queues the job; whatever of that
work holds the engine process's interpreter lock delays every request the process answers.
Prints the probes' latency before and during the upload, and their ratio::

    python -m benchmarks.upload_stall [--rows 150000] [--workers 0]
"""

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.load_stats import percentile
from training.datasets import load_sms_spam


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=150_000, help="rows in the upload")
    parser.add_argument("--workers", type=int, default=0, help="front ends (graft serve)")
    parser.add_argument("--baseline-s", type=float, default=3.0, help="probing before upload")
    parser.add_argument("--probe-ms", type=float, default=10.0, help="pause between probes")
    args = parser.parse_args(argv)
    body = _upload(args.rows)
    with tempfile.TemporaryDirectory() as tmp, _Server(Path(tmp), args.workers) as server:
        probe = _Probe(server.port, args.probe_ms / 1000)
        probe.start()
        time.sleep(args.baseline_s)
        baseline = probe.take()
        started = time.perf_counter()
        status = server.post_train(body)
        upload_s = time.perf_counter() - started
        during = probe.take()
        probe.stop()
    print(f"upload: {len(body) / 1e6:.1f} MB, {args.rows} rows, HTTP {status}, {upload_s:.2f} s")
    print(f"workers: {args.workers}")
    for label, samples in (("before", baseline), ("during", during)):
        print(f"GET /health {label}: {_summary(samples)}")
    if baseline and during:
        ratio = percentile(during, 99) / percentile(baseline, 99)  # both hold probes
        print(f"p99 during / before: {ratio:.1f}x")
    return 0


def _upload(rows: int) -> bytes:
    """JSON lines of real SMS texts, each made distinct so none is dropped as a duplicate."""
    examples = load_sms_spam()
    lines = [b'{"options": {"name": "stall", "epochs": 1}}']
    for index in range(rows):
        example = examples[index % len(examples)]
        text = f"{example.text} #{index}"
        lines.append(json.dumps({"text": text, "label": example.label}).encode())
    return b"\n".join(lines) + b"\n"


def _summary(samples: list[float]) -> str:
    if not samples:
        return "no probes"
    ms = [s * 1000 for s in samples]
    return (
        f"{len(ms)} probes, p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms, "
        f"max {max(ms):.1f} ms"
    )


class _Probe(threading.Thread):
    """GET /health on one kept connection, back to back with a pause; latencies in seconds."""

    def __init__(self, port: int, pause_s: float) -> None:
        super().__init__(daemon=True)
        self._port, self._pause_s = port, pause_s
        self._samples: list[float] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self._port, timeout=60)
        while not self._stopped.is_set():
            started = time.perf_counter()
            conn.request("GET", "/health")
            conn.getresponse().read()
            with self._lock:
                self._samples.append(time.perf_counter() - started)
            time.sleep(self._pause_s)
        conn.close()

    def take(self) -> list[float]:
        with self._lock:
            samples, self._samples = self._samples, []
        return samples

    def stop(self) -> None:
        self._stopped.set()
        self.join()


class _Server:
    """``graft serve`` on a fresh registry with one tenant, in a child process."""

    def __init__(self, root: Path, workers: int) -> None:
        self._root, self._workers = root, workers
        self.port = _free_port()
        self._key = ""
        self._process: subprocess.Popen | None = None

    def __enter__(self) -> "_Server":
        env = os.environ | {"HF_HUB_OFFLINE": "1", "GRAFT_REGISTRY": str(self._root / "reg")}
        graft = [sys.executable, "-m", "server.cli"]
        created = subprocess.run(
            [*graft, "tenants", "create", "acme"], env=env, capture_output=True, text=True
        )
        created.check_returncode()
        self._key = created.stdout.strip().splitlines()[-1]
        serve = ["serve", "--port", str(self.port), "--workers", str(self._workers)]
        self._process = subprocess.Popen(
            [*graft, *serve], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while not self._ready():
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise RuntimeError("graft serve did not become ready")
            time.sleep(0.2)
        return self

    def _ready(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/ready")
            return conn.getresponse().status == 200
        except OSError:
            return False

    def post_train(self, body: bytes) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        headers = {
            "Authorization": f"Bearer {self._key}",
            "Content-Type": "application/x-ndjson",
        }
        conn.request("POST", "/v1/train", body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=60)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
