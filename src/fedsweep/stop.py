"""SIGTERM and SIGINT as a request to stop at the next safe point, not as an immediate death.

SLURM (its warning before a time-limit kill, preemption, ``scancel``) and Snakemake send SIGTERM;
Ctrl-C in a terminal sends SIGINT to the process group. :func:`install_stop_handler` replaces
Python's default actions (die at once, rc -15; a ``KeyboardInterrupt`` traceback) with a handler
that only records the request; :func:`fedsweep.train.run` checks it at safe points, saves the
last finished round if it is not saved yet and exits with 128 + the signal (143, 130).

This module imports nothing heavy (no torch), so the command line can install the handler
before it imports torch and the model libraries, which take seconds: a SIGTERM during those
imports is then recorded too, and the run stops at its first check. ``run`` installs the
handler itself when no one did (and then puts the previous one back when it returns).
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_requested: int | None = None  # the signal received, once one was
_installed = False
_previous: dict[int, Any] = {}


def _handler(signum: int, frame: Any) -> None:
    global _requested
    _requested = signum


def install_stop_handler() -> bool:
    """Make SIGTERM and SIGINT set the stop flag (idempotent); return whether the handler is in place.

    Only the main thread can install signal handlers: elsewhere this returns False and leaves
    signals alone. A request that already arrived stays recorded.
    """
    global _installed, _previous
    if _installed:
        return True
    try:
        _previous = {sig: signal.signal(sig, _handler) for sig in STOP_SIGNALS}
    except ValueError:  # not the main thread
        return False
    _installed = True
    return True


def uninstall_stop_handler() -> None:
    """Put back the handlers that were there before, and forget any request."""
    global _installed, _previous, _requested
    if _installed:
        try:
            for sig, previous in _previous.items():
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        except ValueError:
            pass
    _installed, _previous, _requested = False, {}, None


def handler_installed() -> bool:
    return _installed


def stop_requested() -> bool:
    """Whether a SIGTERM or SIGINT arrived since the handler was installed (or the last request was served)."""
    return _requested is not None


def requested_signal() -> str:
    """The name of the signal that asked to stop (SIGTERM when none did: a collective stop)."""
    return signal.Signals(_requested).name if _requested is not None else "SIGTERM"


def exit_code() -> int:
    """128 + the signal's number: what a shell reports for a process that signal ended."""
    return 128 + (_requested if _requested is not None else signal.SIGTERM)


def clear_stop_request() -> None:
    """Forget a request that has been served (the run stopped, or completed its final writes)."""
    global _requested
    _requested = None
