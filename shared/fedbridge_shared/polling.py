"""The one bounded wait: poll a predicate until it holds or a deadline passes.

The clock and the sleep are injectable (as the server's quorum waits were first written), so a
unit test can run a long wait on a fake clock without sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    *,
    timeout: float,
    interval: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``predicate()``'s first truthy value, or its last (falsy) value once ``timeout`` s have
    passed. It is called at least once, then every ``interval`` s; an exception it raises
    (e.g. a process that died, a stop asked for) ends the wait at once."""
    deadline = clock() + timeout
    while True:
        value = predicate()
        now = clock()
        if value or now >= deadline:
            return value
        sleep(max(0.0, min(interval, deadline - now)))
