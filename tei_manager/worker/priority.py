"""Keep the event loop responsive while the model computes.

On a small machine torch's compute threads take every core, and the event-loop
thread that reads requests and writes answers waits behind them: answers go out
late, requests trickle in, and batches stay small. Compute threads therefore run
at a lower scheduling priority (a higher nice value) than the event loop; they
still get every cycle the event loop does not need.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

COMPUTE_NICE = 10
_lowered = threading.local()


def lower_this_thread() -> None:
    """Give the calling (compute) thread the lower priority, once per thread."""
    if getattr(_lowered, "done", False):
        return
    _lowered.done = True
    _renice(threading.get_native_id())


def lower_other_threads() -> None:
    """Lower every thread of the process but the calling one (the event loop).

    Run after the model's first forward pass, once torch has started its pool of
    intra-op threads.
    """
    me = threading.get_native_id()
    try:
        tids = [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:  # not Linux: leave priorities alone
        return
    for tid in tids:
        if tid != me:
            _renice(tid)


def _renice(tid: int) -> None:
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, max(current, COMPUTE_NICE))
    except OSError as error:  # a thread that just exited, or a platform without it
        log.debug("could not lower the priority of thread %d: %s", tid, error)
