"""pluggy hook specifications: how a plugin adds components to ddiff.

A plugin is a module (or object) with functions marked ``@ddiff.hookimpl`` whose names
match the specifications below. A third-party package declares it in its
``pyproject.toml``::

    [project.entry-points.ddiff]
    my_plugin = "my_package.ddiff_plugin"

ddiff's own built-in plugins are registered the same way.
"""

import pluggy

PROJECT_NAME = "ddiff"
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks ddiff's hook specifications (below)."""
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Marks a plugin's hook implementation: ``@ddiff.hookimpl def ddiff_register_components``."""


@hookspec
def ddiff_register_components(registry: "Registry") -> None:  # noqa: F821
    """Register components into ``registry`` with ``registry.register(slot, name, cls)``.

    Slots: ``data``, ``process``, ``schedule``, ``parameterization``, ``network``,
    ``objective``, ``sampler``, ``weighting``. Each class must be final (not abstract)
    and subclass the slot's protocol; names must be unique within a slot.
    """
