"""Stopping a run from outside: SIGINT (Ctrl-C) and SIGTERM (``ray job stop``, ``timeout``) raise
:class:`Interrupted` in the driver's main thread, so every ``finally`` runs (actors torn down, the
run directory's lock released, a local Ray instance stopped), and the entry point prints one line
saying where the run stopped and how to resume, and exits 130 or 143.

``ray.init`` sets its own SIGTERM handler (``sys.exit``), so :func:`install` runs again after it
(``runtime.cluster.connect``). And a signal that lands while the driver waits in ``ray.get`` comes
out of Ray as a plain ``KeyboardInterrupt``, so the handler also remembers which signal it was:
:func:`stopped` turns any ``KeyboardInterrupt`` back into an :class:`Interrupted`.
"""

from __future__ import annotations

import signal
import sys
import threading

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run; ``where`` is set by the code that knows where it stopped."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signame = signal.Signals(signum).name
        self.code = EXIT_CODES.get(signum, 128 + signum)
        self.where: str | None = None


_received: list[int] = []


def _raise(signum: int, _frame) -> None:
    if _received:  # already stopping: a second signal must not cut the teardown short
        print(
            f"{signal.Signals(signum).name}: already stopping (tearing down the actors, releasing the run "
            "directory); SIGKILL stops at once, leaving the lock to go stale",
            file=sys.stderr,
            flush=True,
        )
        return
    _received.append(signum)
    raise Interrupted(signum)


def stopped(err: KeyboardInterrupt) -> Interrupted:
    """``err`` as the :class:`Interrupted` of the signal that caused it (SIGINT when none was seen)."""
    if isinstance(err, Interrupted):
        return err
    return Interrupted(_received[-1] if _received else signal.SIGINT)


def install() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` (in the main thread only: Python delivers
    signals there)."""
    if threading.current_thread() is threading.main_thread():
        for signum in EXIT_CODES:
            signal.signal(signum, _raise)
