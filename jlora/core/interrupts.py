"""Ctrl-C as a request to stop that is never lost, and never cuts a file being written.

Python raises ``KeyboardInterrupt`` in whichever frame runs when SIGINT arrives. One raised inside a
garbage-collection callback or a ``__del__`` (JAX runs some) is printed as "Exception ignored ...",
with a traceback, and dropped: the program goes on as if no Ctrl-C came. While :func:`watch` is
active, each Ctrl-C is also recorded: :func:`check` raises a dropped one again at the next safe point,
:func:`held` defers one to the end of a block (a checkpoint being written), and a dropped one prints
nothing. Only the main thread receives signals; elsewhere these are no-ops. No JAX here: the
``jlora`` command watches from its first line.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

_pending = False  # a Ctrl-C came and was not handled yet
_holding = 0  # nesting depth of held()


def _on_sigint(signum, frame):
    global _pending
    _pending = True
    if not _holding:
        raise KeyboardInterrupt


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def watch():
    """Ctrl-C recorded (and raised, unless :func:`held`) for the block's duration."""
    if not _main_thread():
        yield
        return
    previous, previous_hook = signal.signal(signal.SIGINT, _on_sigint), sys.unraisablehook

    def quiet(unraisable):  # a KeyboardInterrupt dropped by a callback: recorded already, check() raises it
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous_hook(unraisable)

    sys.unraisablehook = quiet
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = previous_hook


@contextlib.contextmanager
def held():
    """Ctrl-C inside the block waits until it ends, then is raised (unless the block raised)."""
    global _holding
    with watch():
        _holding += 1
        try:
            yield
        finally:
            _holding -= 1
    check()


def pending() -> bool:
    """Whether a Ctrl-C came that no one has handled (:func:`clear`)."""
    return _pending


def check() -> None:
    """Raises ``KeyboardInterrupt`` if a Ctrl-C is pending (one a callback dropped, or one :func:`held`)."""
    if _pending:
        raise KeyboardInterrupt


def clear() -> None:
    """Marks the pending Ctrl-C handled: whoever caught the ``KeyboardInterrupt`` calls this."""
    global _pending
    _pending = False
