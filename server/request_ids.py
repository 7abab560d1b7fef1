"""One id per HTTP request, echoed in ``X-Request-ID``, so a client's report of a failed
call finds the server's log line for it.

A client may send its own id (a proxy's or a tracing system's) and gets it back unchanged when
it is a plain token; anything else is replaced, so a log line never carries what a client
typed into a header.
"""

import re
import uuid

from aiohttp import web

REQUEST_ID_HEADER = "X-Request-ID"
_PLAIN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_KEY = web.RequestKey("graft_request_id", str)


def request_id(request: web.Request) -> str:
    """The request's id: the client's plain token, or a new random one (fixed once asked)."""
    found = request.get(_KEY)
    if found is None:
        sent = request.headers.get(REQUEST_ID_HEADER, "")
        found = sent if _PLAIN.fullmatch(sent) else uuid.uuid4().hex
        request[_KEY] = found
    return found


async def add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: every answer carries the id, streams and errors too."""
    response.headers[REQUEST_ID_HEADER] = request_id(request)
