"""Event loops that finish their tasks before closing, for orbax reads that may fail.

Orbax runs a restore's array reads as one `asyncio.gather` on a fresh event loop and closes that loop as soon as
one read fails, while the other reads are still in flight. When those finish, tensorstore posts their results to
the closed loop ("RuntimeError: Event loop is closed") and the abandoned coroutines complain when collected
("Exception ignored in: <coroutine ...>"): pages of tracebacks after the one clear error line, depending on
timing. Inside `draining_event_loops()` every new loop first waits for its unfinished tasks (their errors are
collected, not printed), so the failed restore ends all its reads before the error reaches the caller.
"""
from __future__ import annotations

import asyncio
import contextlib

# How long a closing loop waits for reads still in flight before cancelling them (an error path only; local
# reads end in milliseconds, a storage bucket's in seconds).
DRAIN_TIMEOUT_S = 60.0


class DrainingEventLoop(asyncio.SelectorEventLoop):
    """A loop whose close() first runs its unfinished tasks to completion (cancelling what is left after
    DRAIN_TIMEOUT_S)."""

    def close(self):
        if not self.is_closed() and not self.is_running():
            pending = asyncio.all_tasks(self)
            if pending:
                self.run_until_complete(_settle(pending))
        super().close()


async def _settle(tasks):
    _, late = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT_S)
    for task in late:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)   # retrieves every task's error: nothing is printed


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    _loop_factory = DrainingEventLoop


@contextlib.contextmanager
def draining_event_loops():
    """Within this block, event loops created by asyncio (as orbax creates one per restore) drain on close."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)
