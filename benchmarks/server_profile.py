"""Where graft's HTTP server spends its event loop's time per request, sampled by py-spy.

    python -m benchmarks.server_profile [--requests 6000] [--concurrency 32]
        [--hidden 64 --layers 2] [--device cuda] [--gil] [--server-workers N]

The server runs in its own process, as deployed, under a closed loop of SMS requests; py-spy
samples its threads' Python stacks meanwhile (``--gil``: only samples holding the interpreter
lock). The report splits the event loop's samples into the parts of a request (the HTTP
protocol, authentication, tokenization, resolution, admission, the step loop's planning and
delivery), with the model thread's samples beside them. With a small random backbone
(``--hidden 64 --layers 2``) or on a GPU, the model is cheap and the event loop bounds the
server: this shows what a front end in processes of its own would take off it.
``--server-workers N`` serves through N front-end processes and profiles the engine's
process, which then sees requests as token ids over the link (server/link.py).

py-spy must be allowed to read the server's memory (ptrace): root, or
``kernel.yama.ptrace_scope`` 0.
"""

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TEXT = "Free entry in 2 a wkly comp to win FA Cup final tkts 21st May 2005. Text FA to 87121"

# the parts of a request on the event loop: (label, frames any of which marks a sample), in
# the order the report lists them; a sample counts once per part, parts may nest
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("HTTP request, whole (aiohttp)", ("RequestHandler._handle_request",)),
    ("  classify route", ("classify (server/routes.py)",)),
    ("    authenticate (registry)", ("authenticate (server/routes.py)",)),
    ("    body read and parse", ("read_body (server/routes.py)", "parse_body (server/routes.py)")),
    (
        "    Engine.submit",
        ("EngineRequests.submit (", "EngineRequests.submit_nowait (", "EngineRequests.submit_many"),
    ),
    ("      tokenize", ("EngineRequests._tokenize",)),
    ("      resolve (registry)", ("resolve_model (engine/admission.py)",)),
    ("  response write", ("RequestHandler.finish_response",)),
    (
        "request handed over by a front end (--server-workers)",
        ("LinkServer._start", "LinkServer._admit", "answered (server/link.py"),
    ),
    ("  its answer encoded and framed", ("encode (server/schemas.py)", "frame (server/link")),
    (
        "front ends' frames read (the admission above nests)",
        ("_Connection.data_received (server/link.py)",),
    ),
    ("step loop: plan, hand off, deliver", ("StepLoop.run",)),
)
OTHER = "none of these: the loop's own I/O and callbacks"
_THREAD_ROOT = "Thread._bootstrap (threading.py)"  # any thread but the main one
_MODEL_STEP = "StepLoop._timed_step"
_ATTACH_TIMEOUT_S = 30.0
_LINE = re.compile(r"^(.*) (\d+)$")
_LINE_NUMBER = re.compile(r":\d+\)")


@dataclass(frozen=True, slots=True)
class Profile:
    """Sample counts of one recording, by thread kind and by request part."""

    num_samples: int  # every sample of every thread
    event_loop: int  # samples of the main thread, which runs the event loop
    model: int  # samples inside a model step
    parts: dict[str, int]  # event-loop samples per part of PARTS, then OTHER
    top: list[tuple[str, int]]  # event-loop frames by inclusive samples, most first
    # frames of model steps (below the step itself) by inclusive samples, most first: on a
    # GPU the step's host work (its inputs, the heads) competes with the event loop
    model_top: list[tuple[str, int]] = field(default_factory=list)


def parse_raw(lines: Iterable[str], top: int = 25) -> Profile:
    """A py-spy ``--format raw`` recording (``frame;frame;... count`` per line)."""
    total = loop = model = 0
    parts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    in_steps: Counter[str] = Counter()
    for line in lines:
        found = _LINE.match(line.strip())
        if found is None:
            continue
        stack, count = _LINE_NUMBER.sub(")", found.group(1)), int(found.group(2))
        total += count
        if _MODEL_STEP in stack:
            model += count
            below = stack.split(_MODEL_STEP, 1)[1].split(";")[1:]
            for frame in set(below):
                in_steps[frame] += count
        if _THREAD_ROOT in stack:
            continue
        loop += count
        for frame in set(stack.split(";")):
            inclusive[frame] += count
        matched = False
        for label, marks in PARTS:
            if any(mark in stack for mark in marks):
                parts[label] += count
                matched = True
        if not matched:
            parts[OTHER] += count
    return Profile(
        num_samples=total,
        event_loop=loop,
        model=model,
        parts={label: parts[label] for label in (*(label for label, _ in PARTS), OTHER)},
        top=inclusive.most_common(top),
        model_top=in_steps.most_common(top),
    )


def report(profile: Profile) -> str:
    """Each part's share of the event loop's samples. Shares only: py-spy pauses the server
    for every sample, so it runs slower while recorded, and sampled times are not its own."""
    loop = max(profile.event_loop, 1)
    lines = [
        f"samples: {profile.event_loop} of the event loop, {profile.model} in model steps",
        "event loop, by part of a request (parts nest; shares of the event loop's samples):",
    ]
    for label, samples in profile.parts.items():
        lines.append(f"  {label:<50} {samples / loop:6.1%}")
    if profile.top:
        lines.append("event loop, frames by inclusive samples:")
    for frame, samples in profile.top:
        lines.append(f"  {samples / loop:6.1%}  {frame[:110]}")
    if profile.model_top:
        lines.append("model steps, frames by inclusive samples (shares of the steps' samples):")
    for frame, samples in profile.model_top:
        lines.append(f"  {samples / max(profile.model, 1):6.1%}  {frame[:110]}")
    return "\n".join(lines)


def _py_spy() -> str:
    found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit("py-spy is not installed: pip install py-spy (make setup installs it)")
    return found


async def record(args: argparse.Namespace, work: Path, out: Path) -> tuple[int, float]:
    """Serve, load, and record the server process: (requests answered, seconds taken)."""
    from benchmarks.open_loop import closed_loop
    from benchmarks.server_cpu import fleet_and_options, warm_server

    fleet, options = fleet_and_options(args, work, server_workers=args.server_workers)
    requests = [(i % len(fleet.models), (TEXT,)) for i in range(args.requests)]
    async with warm_server(fleet, options, requests, args) as (server, _, _, target):
        spy = _start_spy(args, server.pid, out)
        try:
            await _sampling(spy)
            answered, wall_s = await closed_loop(target, requests, concurrency=args.concurrency)
        finally:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            _, errors = await asyncio.to_thread(spy.communicate, timeout=30)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"py-spy recorded nothing (exit {spy.returncode}): {errors.strip()}")
    return answered, wall_s


async def _sampling(spy: subprocess.Popen) -> None:
    """Until py-spy says it samples: a short run that ended before it attached was stopped
    before its first sample, and py-spy then writes nothing."""
    assert spy.stdout is not None and spy.stderr is not None
    line = await asyncio.wait_for(asyncio.to_thread(spy.stdout.readline), _ATTACH_TIMEOUT_S)
    if "Sampling" not in line:  # py-spy says so on its standard output
        errors = await asyncio.to_thread(spy.stderr.read) if spy.poll() is not None else ""
        raise RuntimeError(f"py-spy did not start sampling: {(line + errors).strip()}")


def _start_spy(args: argparse.Namespace, pid: int | None, out: Path) -> subprocess.Popen:
    command = [_py_spy(), "record", "--pid", str(pid), "--format", "raw", "--output", str(out)]
    command += ["--rate", str(args.rate)]
    if args.gil:
        command.append("--gil")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=6000, help="requests while recording")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--adapters", type=int, default=100)
    p.add_argument("--tenants", type=int, default=10)
    p.add_argument("--hidden", type=int, default=None, help="a random-weight BERT this wide")
    p.add_argument("--layers", type=int, default=None, help="with --hidden: its depth (2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:n]")
    p.add_argument("--threads", type=int, default=None, help="the model thread's torch threads")
    p.add_argument("--quantize", default="none", help="none or int8")
    p.add_argument(
        "--server-workers",
        type=int,
        default=0,
        help="front-end processes (graft serve --workers); the engine's process is profiled",
    )
    p.add_argument("--rate", type=int, default=200, help="py-spy samples a second")
    p.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    p.add_argument("--top", type=int, default=25, help="event-loop frames listed")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/server_profile"))
    args = p.parse_args(argv)
    if args.layers is not None and args.hidden is None:
        p.error("--layers needs --hidden")
    return args


def main(argv: Sequence[str] | None = None) -> Profile:
    from benchmarks.common import serial_torch_here

    serial_torch_here()
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _py_spy()  # fail before building anything
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "server_profile.txt"
    raw.unlink(missing_ok=True)  # a failed recording must not report an old one
    with tempfile.TemporaryDirectory(prefix="graft-server-profile-") as tmp:
        answered, wall_s = asyncio.run(record(args, Path(tmp), raw))
    if answered != args.requests:
        raise SystemExit(f"{args.requests - answered} of {args.requests} requests failed")
    with raw.open() as lines:
        profile = parse_raw(lines, args.top)
    print(
        f"{answered} requests, {args.concurrency} in flight, {answered / wall_s:.0f} req/s while "
        f"sampled; raw stacks: {raw}"
    )
    print(report(profile))
    return profile


if __name__ == "__main__":
    from benchmarks.common import exit_on_sigterm

    exit_on_sigterm()
    main()
