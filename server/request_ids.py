"""One id per HTTP request, echoed in ``X-Request-ID``, so a client's report of a failed
call finds the server's log line for it.

A client may send its own id (a proxy's or a tracing system's) and gets it back unchanged when
it is a plain token; anything else is replaced, so a log line never carries what a client
typed into a header.
"""

import itertools
import os
import re
import uuid

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-ID"
_PLAIN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_KEY = web.RequestKey("graft_request_id", str)
# new ids: a random prefix per process and a counter, 32 hex digits like a UUID's. Unique, not
# secret (nothing is keyed on them); uuid4 per request read the OS's random source every time
# (a syscall, so a trip away from the interpreter lock, ~12 us on a loaded server)
_PREFIX = uuid.uuid4().hex[:16]
_COUNTER = itertools.count()


def _new_prefix() -> None:  # a forked child must not repeat its parent's ids
    global _PREFIX
    _PREFIX = uuid.uuid4().hex[:16]


os.register_at_fork(after_in_child=_new_prefix)


def request_id(request: web.Request) -> str:
    """The request's id: the client's plain token, or a new random one (fixed once asked)."""
    found = request.get(_KEY)
    if found is None:
        sent = request.headers.get(REQUEST_ID_HEADER, "")
        found = sent if _PLAIN.fullmatch(sent) else f"{_PREFIX}{next(_COUNTER):016x}"
        request[_KEY] = found
    return found


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: every answer carries the id, streams and errors too."""
    response.headers[REQUEST_ID_HEADER] = request_id(request)
