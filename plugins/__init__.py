"""ddiff's built-in plugins, installed as the package ``ddiff_plugins``.

Each module registers its components through the ``ddiff_register_components`` hook and
is declared in the ``ddiff`` entry-point group of pyproject.toml, exactly as a
third-party plugin would be. They import only ddiff's public API.
"""
