"""Files written whole or not at all: a reader never sees half a file, and a crash mid-write
leaves the previous version in place; and numbered output names reserved atomically, so
that two commands writing beside each other never pick the same one."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddiff._errors import RecipeError, RunDirectoryError

PID_DIGITS = 7
"""Most digits of a process id (Linux's ``pid_max`` is at most 2**22)."""


def _temporary_name(name: str, pid: str) -> str:
    return f".{name}.tmp-{pid}"


def check_name_fits(path: Path, option: str, suffix: str = "") -> None:
    """Refuse an output ``path`` (written as ``path + suffix``) whose name, or that of the
    temporary file written beside it (:func:`atomic_write_bytes`), is longer than its
    folder's file system allows (``NAME_MAX``, 255 bytes on most), before anything is
    computed."""
    try:
        limit = os.pathconf(path.parent if str(path.parent) else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = len(os.fsencode(_temporary_name(path.name + suffix, "9" * PID_DIGITS)))
    if longest > limit:
        allowed = len(os.fsencode(path.name)) - (longest - limit)
        raise RecipeError(
            f"{option} {path.name[:32]}...: a name of {len(os.fsencode(path.name))} bytes is too long "
            f"for the file system of {path.parent} (at most {allowed} here, with the temporary name "
            f"written beside it); choose a shorter name",
            source="command line",
        )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, and rename it
    over ``path``; on any failure (a full disk, an interrupt) the temporary file is removed
    and ``path`` is as it was."""
    temporary = path.with_name(_temporary_name(path.name, str(os.getpid())))
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode())


def gibibytes(size: int) -> str:
    """``size`` bytes in GiB, as a user reads it (``256.0 GiB``)."""
    return f"{size / 2**30:.1f} GiB"


def numbered(path: Path, number: int) -> Path:
    """``name.ext`` with ``-number`` before its extension (``eval.json`` -> ``eval-2.json``);
    number 1 is ``path`` itself."""
    path = Path(path)
    return path if number == 1 else path.with_name(f"{path.stem}-{number}{path.suffix}")


def _reservation(path: Path) -> Path:
    """The hidden marker that reserves ``path``'s name while its files are written."""
    return path.with_name(f".{path.name}.reserved")


def _taken(path: Path, suffixes: tuple[str, ...]) -> bool:
    return any(Path(f"{path}{suffix}").exists() for suffix in suffixes)


def unused_path(path: Path, suffixes: tuple[str, ...] = ("",)) -> Path:
    """The first of ``path``, ``path-2``, ``path-3``, ... (the number before the
    extension) for which no file ``path + suffix`` exists for any of ``suffixes`` and
    that no running command has reserved (:func:`reserved_path`): a result is never
    written over an earlier one. ``suffixes`` serves results written as several files
    (``.txt``, ``.npy``, ``.json`` of one stem)."""
    number = 1
    while _taken(numbered(path, number), suffixes) or _reservation(numbered(path, number)).exists():
        number += 1
    return numbered(path, number)


@contextmanager
def reserved_path(path: Path, suffixes: tuple[str, ...] = ("",), *, reserve: bool = True) -> Iterator[Path]:
    """:func:`unused_path`, held for the ``with`` block: its name is reserved by creating
    a hidden marker beside it exclusively (``O_CREAT | O_EXCL``, atomic on every local
    file system), so two commands started together get two names; the block writes the
    files, and the marker is removed after it. A name whose files appeared between the
    look and the reservation (a command that had just finished) is passed over. The
    folder is created if missing; one that cannot be written raises
    ``RunDirectoryError``. ``reserve=False`` (the processes of a multi-process run
    that write nothing) only looks."""
    if not reserve:
        yield unused_path(path, suffixes)
        return
    number = 1
    while True:
        candidate = numbered(path, number)
        marker = _reservation(candidate)
        if not _taken(candidate, suffixes):
            try:
                candidate.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            except FileExistsError:
                pass
            except OSError as error:
                raise RunDirectoryError(
                    f"cannot write in {candidate.parent} ({error.strerror}); make it writable"
                ) from None
            else:
                if not _taken(candidate, suffixes):
                    break
                marker.unlink(missing_ok=True)
        number += 1
    try:
        yield candidate
    finally:
        marker.unlink(missing_ok=True)
