"""User-facing errors: one line saying what went wrong, where, and what to do."""


class DdiffError(Exception):
    """Base class of every error that is the user's to fix (never a bug in ddiff).

    The command line prints ``str(error)`` on one line and exits with status 2,
    without a traceback.
    """


class RecipeError(DdiffError):
    """A recipe (or a command-line override) that cannot be turned into components."""

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None):
        self.source = source
        self.path = path
        self.message = message
        if path is not None and not path.isprintable():
            path = repr(path)
        where = ": ".join(part for part in (source, path) if part)
        super().__init__(f"{where}: {message}" if where else message)


class RegistryError(DdiffError):
    """A registration that the registry refuses, or a lookup of an unknown name."""


class IncompatibleComponentsError(RecipeError):
    """Two components of a recipe that cannot work together."""


class RunDirectoryError(DdiffError):
    """A run directory that cannot be used as asked (other recipe, no checkpoint, ...)."""


class DataError(DdiffError):
    """A data set that is missing, malformed, or inconsistent with the recipe."""


def check_at_least(name: str, value: int | float, minimum: int | float = 1) -> None:
    """Refuse a hyper-parameter below ``minimum`` (``steps must be >= 1, got 0``).

    Call it in a component's ``__check_init__`` (or a settings dataclass's
    ``__post_init__``) with the constructor argument's ``name``: the error's path is that
    name, relative to the component's recipe section, to which the recipe builder adds
    the section's path (``sampler.steps``).

    Raises:
        RecipeError: ``value < minimum``.
    """
    if not value >= minimum:
        raise RecipeError(f"{name} must be >= {minimum}, got {value}", path=name)
