"""The ``ddiff`` command line: the parser built from the commands'
(:mod:`ddiff.runner.commands`), the dispatch, and the one-line refusal.

Every mistake a user can make ends in one ``ddiff: error:`` line and exit status 2: an
argument of the wrong type or range is refused by the parser before anything is loaded
or compiled, and recipe, run-directory and data errors are :class:`ddiff.DdiffError`.
Recipe overrides (``key.path=value``) may stand before or after the options.
"""

import argparse
import difflib
import errno
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import jax

import ddiff
from ddiff._config import set_typecheck
from ddiff._errors import DdiffError
from ddiff._registry import default_registry
from ddiff.runner.commands import COMMANDS
from ddiff.runner.distributed import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from ddiff.runner.trainer.signals import CommandSignals

QUIET_ABOUT_PLUGINS = ("plot", "plugins")
"""Commands that never warn about plugins that failed to import (``plugins`` lists them)."""


class UsageError(DdiffError):
    """A command line the parser refuses (unknown option, wrong type or range)."""


class _Formatter(argparse.HelpFormatter):
    """Help that states every option's default (``(default: 16)``; ``(default: off)``
    for a flag) unless its text already says what happens by default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.nargs == argparse.ZERO_OR_MORE:
            return f"{text} (default: none)"
        if action.option_strings or action.nargs == argparse.OPTIONAL:
            return f"{text} (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """An argument parser whose refusals are one line (:class:`UsageError`), not a
    usage block."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def _version() -> str:
    try:
        return version("ddiff")
    except PackageNotFoundError:
        return ddiff.__version__


def build_parser() -> argparse.ArgumentParser:
    """The ``ddiff`` parser, with one subcommand per module of
    :data:`ddiff.runner.commands.COMMANDS`."""
    parser = _Parser(
        prog="ddiff",
        description="Discrete diffusion models: train, evaluate, sample.",
        epilog="Run 'ddiff COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"ddiff {_version()}")
    parser.add_argument(
        "--no-typecheck",
        action="store_true",
        help="turn off the trace-time shape and dtype checks of protocol calls",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command_parser = commands.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
        command.add_arguments(command_parser)
        command_parser.set_defaults(handler=command.run)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[args.command]
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; arguments the parser leaves over that are overrides
    (``key.path=value``) join the command's overrides wherever they stood."""
    args, extra = parser.parse_known_args(argv)
    takes_overrides = hasattr(args, "overrides")
    unknown = [item for item in extra if not takes_overrides or item.startswith("-") or "=" not in item]
    if unknown:
        message = f"unrecognized arguments: {' '.join(unknown)}"
        options = [
            option
            for action in _command_parser(parser, args)._actions
            for option in action.option_strings
        ]
        close = difflib.get_close_matches(unknown[0].split("=")[0], options, n=1)
        if close:
            message += f"; did you mean {close[0]}?"
        prog = f"ddiff {args.command}"
        raise UsageError(f"{prog}: {message} (see {prog} --help)")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _joins_a_distributed_run(args: argparse.Namespace) -> bool:
    """Whether the command starts ``jax.distributed`` (which must come before anything
    starts a backend): options of ``ddiff run`` or the ``DDIFF_*`` variables."""
    options = ("coordinator_address", "num_processes", "process_id", "distributed")
    variables = (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    return any(getattr(args, name, None) not in (None, False) for name in options) or any(
        name in os.environ for name in variables
    )


def _check_backend(args: argparse.Namespace) -> None:
    """Refuse a ``JAX_PLATFORMS`` that names a backend this machine cannot start
    (``tpu`` on a CPU machine, a misspelt name), before the command does anything. A
    process joining a distributed run is not checked here: starting the backend first
    would stop ``jax.distributed`` from starting (it reports a bad backend itself)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if not platforms or _joins_a_distributed_run(args):
        return
    try:
        jax.devices()
    except (RuntimeError, AssertionError) as error:  # jax asserts on some platforms it cannot start
        lines = str(error).splitlines() or ["no backend of that name could be started"]
        reason = lines[0].split(" (set JAX_PLATFORMS")[0].rstrip(". ")
        raise DdiffError(
            f"JAX_PLATFORMS={platforms}: {reason}; unset JAX_PLATFORMS (or name a backend this "
            f"machine has, e.g. cpu)"
        ) from None


UNWRITABLE = {
    errno.EACCES: "check its permissions and its folder's, or choose another place",
    errno.EPERM: "check its permissions and its folder's, or choose another place",
    errno.EROFS: "the file system is read-only; choose another place",
    errno.ENOSPC: "free some space, or choose another place",
    errno.EDQUOT: "free some space, or choose another place",
}
"""The errors of a file a command could not open or write that are the user's environment
(permissions, a read-only or full file system), not ddiff, and what to do about each."""


def _unwritable(error: OSError) -> str | None:
    """The one line for a file a command could not open or write (a name too long for its
    file system, missing permissions, a read-only or full file system), or None for any
    other error."""
    name = os.fsdecode(error.filename or "")
    folder = os.path.dirname(name) or "."
    if error.errno == errno.ENAMETOOLONG:
        return (
            f"{os.path.basename(name)[:32]}...: file name too long for the file system of {folder}; "
            f"choose a shorter name"
        )
    if error.errno in UNWRITABLE:
        return f"{name or 'a file'}: {error.strerror}; {UNWRITABLE[error.errno]}"
    return None


def _quiet_broken_pipe() -> int:
    """The output pipe was closed (``ddiff plugins | head -1``): stop quietly, with the
    status of a process ended by SIGPIPE, and point stdout at /dev/null so that the
    interpreter's last flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - stdout for the rest of the process
    finally:
        os.close(devnull)
    return 141


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ddiff`` command: parse ``argv`` (default: the command line), run the command,
    and return the exit status (2 with one line on stderr for a user's mistake). SIGINT
    or SIGTERM at any moment ends it with one line and status 128 + the signal's number,
    its temporary files removed (:class:`~ddiff.runner.trainer.signals.CommandSignals`)."""
    with CommandSignals():
        try:
            return _main(argv)
        except KeyboardInterrupt as error:
            signum = getattr(error, "signum", signal.SIGINT)
            print(f"ddiff: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
            return 128 + signum


def _main(argv: Sequence[str] | None) -> int:
    try:
        try:
            args = _parse(build_parser(), argv)
        except SystemExit as exit:  # --help, --version
            return exit.code if isinstance(exit.code, int) else 0
        if args.no_typecheck:
            set_typecheck(False)
        if args.command not in QUIET_ABOUT_PLUGINS:
            for plugin in default_registry().broken:
                print(f"ddiff: warning: {plugin}", file=sys.stderr)
            _check_backend(args)
        args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except OSError as error:
        message = _unwritable(error)
        if message is None:
            raise
        print(f"ddiff: error: {message}", file=sys.stderr)
        return 2
    except DdiffError as error:
        status = getattr(error, "exit_status", 2)
        prefix = "ddiff: " if status != 2 else "ddiff: error: "
        message = str(error).replace("\r", "\\r").replace("\n", "\\n")
        print(f"{prefix}{message}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
