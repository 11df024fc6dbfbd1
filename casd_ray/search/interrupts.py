"""A Ctrl-C (or SIGTERM, which the CLI turns into one) during a search is never lost.

Ray Tune stops a search gracefully, saving its state, once ``fit()`` has installed its own
SIGINT handler, well into its set-up. Before that moment Python's KeyboardInterrupt is raised
wherever the main thread happens to be, and code that catches what it interrupts loses it:
once in CI a Ctrl-C right after the search's log line vanished, the search ran to the end,
was fine-tuned and the run exited 0. So for the whole search :func:`recorded` puts a handler
in front of the caller's that *records* the signal before passing it on;
:class:`ForwardInterrupt` hands a recorded signal to Tune's handler at the search's first
step, and ``run_search`` checks :func:`received` before and after ``fit()``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ray import tune

# Signals recorded while a search runs, and how many were handed on to Tune. Module-level:
# Tune pickles its callbacks into the experiment state, so they cannot hold the record.
_RECEIVED: list[int] = []
_FORWARDED: list[int] = []


def received() -> bool:
    """Whether an interrupt reached the search since :func:`recorded` began."""
    return bool(_RECEIVED)


@contextmanager
def recorded() -> Iterator[None]:
    """Record every SIGINT while the block runs, then pass it to the caller's handler (which
    raises KeyboardInterrupt at once, as before). A SIGINT the caller ignores stays ignored,
    and off the main thread (where no handler can be set) nothing changes."""
    _RECEIVED.clear()
    _FORWARDED.clear()
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return

    def record(signum: int, frame) -> None:
        _RECEIVED.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGINT, record)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class ForwardInterrupt(tune.Callback):
    """Hands an interrupt recorded before Tune's handler existed on to that handler (or
    whichever is in force), once, at the next step of the search loop: Tune then stops
    and saves its state as after any Ctrl-C."""

    def on_step_begin(self, iteration, trials, **info) -> None:
        if len(_RECEIVED) > len(_FORWARDED):
            _FORWARDED[:] = _RECEIVED
            handler = signal.getsignal(signal.SIGINT)
            if callable(handler):
                handler(signal.SIGINT, None)
