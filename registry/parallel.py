"""Running many blocking file operations at once, so their fsyncs overlap.

An fsync mostly waits for the disk to flush. ext4 (like most journaling file systems) commits
concurrent fsyncs together, so N of them issued from a few threads cost little more than one,
where N issued one after another cost N flushes. The threads live only for one call.
"""

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


def map_in_threads(
    function: Callable[[_Item], _Result], items: Sequence[_Item], max_workers: int
) -> list[_Result]:
    """`[function(item) for item in items]`, run by up to `max_workers` threads.

    Results come back in item order. If calls fail, the error of the lowest failing index is
    raised, after the calls already running have finished and without starting any more (so the
    caller's cleanup never races a worker). With `max_workers` <= 1 everything runs inline.
    """
    num_workers = min(max_workers, len(items))
    if num_workers <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(num_workers, thread_name_prefix="graft-registry-io") as pool:
        futures = [pool.submit(function, item) for item in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()
            raise
