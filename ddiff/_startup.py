"""What must happen before anything heavy is imported: a ``ddiff`` command stopped by
Ctrl-C or SIGTERM while it is still importing says so in one line, and libtpu stays quiet
on a host without TPU chips.

A ``ddiff`` command installs its signal handling when its ``main`` starts
(:class:`ddiff.runner.trainer.signals.CommandSignals`), after about two seconds of
importing JAX and the plugins; a signal in those seconds would end in a raw
``KeyboardInterrupt`` traceback, or be swallowed by a library catching it. Until then the
command's process (the ``ddiff`` script or ``python -m ddiff``, nothing that merely
imports ddiff) ends at once on SIGINT or SIGTERM with one line and status 128 + the
signal's number: nothing has been written yet.

With libtpu installed (``pip install -e '.[tpu]'``, for ``ddiff compile``'s ahead-of-time
TPU compilation on any machine), JAX tries to start a TPU client at its first use of a
device, and on a host without TPU chips libtpu prints several lines of warnings and a C++
error before JAX falls back to the CPU. Where this host has no TPU chip, libtpu is told
what it would otherwise look up and complain about (``TPU_ACCELERATOR_TYPE`` and
``TPU_WORKER_HOSTNAMES``, unless already set), so it fails quietly, and that processes
may load it side by side (``ALLOW_MULTIPLE_LIBTPU_LOAD``); compiling for a TPU
topology (``jax.experimental.topologies``) is unaffected. A host with TPU chips is left
alone.
"""

import importlib.util
import os
import signal
import sys

QUIET_TPU_ENVIRONMENT = {
    "TPU_ACCELERATOR_TYPE": "v5litepod-1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}
"""What libtpu is told on a host without TPU chips: what it looks up and warns about
otherwise, and that several processes may load it at once (its lock file guards chips
this host does not have; without this, two processes compiling for TPU topologies at
the same time, e.g. two test workers, fail)."""


def has_tpu_chips() -> bool:
    """Whether this host has TPU chips (JAX's own PCI probe)."""
    from jax._src import hardware_utils  # JAX's probe; nothing public says the same

    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def quiet_absent_tpu() -> None:
    """Set :data:`QUIET_TPU_ENVIRONMENT` where libtpu is installed and no TPU chip is."""
    if importlib.util.find_spec("libtpu") is None or has_tpu_chips():
        return
    for name, value in QUIET_TPU_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def is_ddiff_command() -> bool:
    """Whether this process is the ``ddiff`` command (its script, or ``python -m ddiff``)."""
    if os.path.basename(sys.argv[0] if sys.argv else "") == "ddiff":
        return True
    arguments = list(getattr(sys, "orig_argv", []))
    return any(a == "-m" and b == "ddiff" for a, b in zip(arguments, arguments[1:], strict=False))


def _interrupted_while_starting(signum: int, _frame: object) -> None:
    os.write(2, f"ddiff: interrupted by {signal.Signals(signum).name}\n".encode())
    os._exit(128 + signum)


def stop_cleanly_while_starting() -> None:
    """In the ``ddiff`` command, end on SIGINT or SIGTERM with one line until the command's
    own handlers replace these."""
    if is_ddiff_command():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, _interrupted_while_starting)


stop_cleanly_while_starting()
quiet_absent_tpu()
