"""The ``ddiff`` commands, one module each. A command module names the command
(``NAME``), its line in ``ddiff --help`` (``HELP``) and the text atop its own help
(``DESCRIPTION``); ``add_arguments(parser)`` adds its arguments to its parser, and
``run(args)`` runs it with the parsed arguments."""

from ddiff.runner.commands import (
    bench,
    compile,
    diagnose,
    eval,
    plot,
    plugins,
    quality,
    recipe,
    run,
    sample,
)

COMMANDS = (run, eval, plot, sample, diagnose, plugins, bench, compile, quality, recipe)
"""The command modules, in the order ``ddiff --help`` lists them."""
