"""Stopping on SIGTERM or SIGINT: at once outside a training loop (:class:`Interrupted`,
which unwinds through every command's clean-up), at a step boundary after a checkpoint
within one (:class:`StopSignals`)."""

import os
import signal
import threading
from pathlib import Path
from typing import Any

from ddiff._errors import DdiffError


class Stopped(DdiffError):
    """Training stopped by SIGTERM or SIGINT after saving a checkpoint."""

    def __init__(self, signum: int, step: int, workdir: Path):
        self.exit_status = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}; checkpoint saved in {workdir}; "
            f"run the same command again to resume"
        )


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM received outside a training loop (``signum``): the command
    stops, removing its temporary files on the way out as on Ctrl-C."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_first_received: list[int] = []
"""The first stop signal this process received under :class:`CommandSignals` (empty: none)."""


def _install(handler: Any) -> dict[int, Any]:
    """Handle STOP_SIGNALS with ``handler`` (in the main thread only, where Python allows
    it); returns the handlers it replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


def _restore(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`_install` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


class CommandSignals:
    """Within the block (a whole ``ddiff`` command, from its first line), SIGTERM and
    SIGINT raise :class:`Interrupted`, even where the process was started with SIGINT
    ignored (a background job of a script), and the first one is remembered: a signal
    whose exception some library swallowed still stops a training loop at its first step
    boundary (:class:`StopSignals`), and a second signal outside a training loop ends the
    process at once with the same line. The previous handlers come back after the block."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if _first_received:
            # The first signal's exception was swallowed (raised where exceptions are
            # ignored, as in a garbage-collection callback, or caught by a library) and
            # the command went on: stop at once.
            os.write(2, f"ddiff: interrupted by {signal.Signals(signum).name}\n".encode())
            os._exit(128 + signum)
        _first_received.append(signum)
        raise Interrupted(signum)

    def __enter__(self) -> "CommandSignals":
        _first_received.clear()
        self._previous = _install(self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        _restore(self._previous)
        _first_received.clear()


class StopSignals:
    """Within the block, the first SIGTERM or SIGINT sets ``received`` (the loop saves and
    stops at the next step boundary); a second one interrupts at once. A signal received
    earlier in the command (:class:`CommandSignals`) counts as the first."""

    def __init__(self) -> None:
        self.received: int | None = _first_received[0] if _first_received else None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopSignals":
        self._previous = _install(self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        _restore(self._previous)
