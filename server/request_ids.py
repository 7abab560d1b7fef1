"""One id per HTTP request, echoed in ``X-Request-ID``, so a client's report of a failed
call finds the server's log line for it.

A client may send its own id (a proxy's or a tracing system's) and gets it back unchanged when
it is a plain token; anything else is replaced, so a log line never carries what a client
typed into a header.
"""

import hashlib
import itertools
import os
import re

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-ID"
_PLAIN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_KEY = web.RequestKey("graft_request_id", str)
# new ids: a counter under a keyed hash drawn once per process, 32 hex digits like a UUID's.
# uuid4 read the OS's random source on every request (a syscall, so a trip away from the
# interpreter lock, ~12 us on a loaded server); a bare counter would tell every client how
# many requests the server took between two of its own
_SECRET = os.urandom(32)
_COUNTER = itertools.count()


def _new_secret() -> None:  # a forked child must not repeat its parent's ids
    global _SECRET
    _SECRET = os.urandom(32)


os.register_at_fork(after_in_child=_new_secret)


def _new_id() -> str:
    count = next(_COUNTER).to_bytes(8, "little")
    return hashlib.blake2b(count, key=_SECRET, digest_size=16).hexdigest()


def request_id(request: web.Request) -> str:
    """The request's id: the client's plain token, or a new random one (fixed once asked)."""
    found = request.get(_KEY)
    if found is None:
        sent = request.headers.get(REQUEST_ID_HEADER, "")
        found = sent if _PLAIN.fullmatch(sent) else _new_id()
        request[_KEY] = found
    return found


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: every answer carries the id, streams and errors too."""
    response.headers[REQUEST_ID_HEADER] = request_id(request)
