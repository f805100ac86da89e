"""Stopping on SIGTERM or SIGINT at a step boundary, after a checkpoint."""

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


class StopSignals:
    """Within the block, the first SIGTERM or SIGINT sets ``received`` (the loop saves and
    stops at the next step boundary); a second one interrupts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
