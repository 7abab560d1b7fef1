"""Malformed HTTP from clients is logged as one short warning, at most one per interval.

aiohttp answers a request it cannot parse (a bad request line, a header past its limits) with a
400 and logs it at ERROR with a full traceback. The fault is the client's, and a client that
sends garbage in a loop would fill the log with tracebacks. The filter below turns each such
record into a one-line WARNING, and drops the rest of a burst, counting them into the next line.
"""

import logging
import re
import time
from collections.abc import Callable

from aiohttp.http_exceptions import HttpProcessingError

SERVER_LOGGER = "aiohttp.server"  # the logger aiohttp's request handler writes to
INTERVAL_S = 10.0
_MAX_DETAIL_CHARS = 200


class MalformedRequestFilter(logging.Filter):
    """Rewrites aiohttp's records of unparseable requests; passes every other record as is."""

    def __init__(
        self, interval_s: float = INTERVAL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._next_at = float("-inf")
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.levelno < logging.ERROR or not isinstance(error, HttpProcessingError):
            return True  # aiohttp's own DEBUG line for a first bad method stays as it is
        now = self._clock()
        if now < self._next_at:
            self._dropped += 1
            return False
        self._next_at = now + self._interval_s
        detail = re.sub(r"\s+", " ", str(error.message or error)).strip()[:_MAX_DETAIL_CHARS]
        message = f"{record.getMessage()}: {error.code} {detail}"
        if self._dropped:
            message += f" ({self._dropped} more since the last such line)"
            self._dropped = 0
        record.msg, record.args = message, None
        record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        record.exc_info = record.exc_text = None
        return True


def quiet_malformed_requests() -> None:
    """Install the filter on aiohttp's server logger once per process."""
    logger = logging.getLogger(SERVER_LOGGER)
    if not any(isinstance(f, MalformedRequestFilter) for f in logger.filters):
        logger.addFilter(MalformedRequestFilter())
