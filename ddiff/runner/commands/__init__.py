"""The ``ddiff`` commands, one module each: every module has ``add_parser(commands)``,
which adds the command's parser (its options and help) to the ``ddiff`` parser's
subcommands and sets its handler, and ``run(args)``, which runs it."""

from ddiff.runner.commands import bench, diagnose, eval, plot, plugins, quality, recipe, run, sample

COMMANDS = (run, eval, plot, sample, diagnose, plugins, bench, quality, recipe)
"""The command modules, in the order ``ddiff --help`` lists them."""
