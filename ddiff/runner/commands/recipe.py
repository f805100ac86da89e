"""``ddiff recipe show RECIPE``: print a recipe fully resolved, every default filled in."""

import argparse

from ddiff.runner.commands.options import add_target
from ddiff.runner.recipe import load_recipe

NAME = "recipe"
HELP = "inspect recipes"
DESCRIPTION = HELP
"""The command's name, its line in ``ddiff --help`` and the text atop its own help."""

SHOW = "print the fully resolved recipe"
"""The help of the subcommand ``show``."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``recipe`` command's subcommand ``show`` and its arguments."""
    subcommands = parser.add_subparsers(dest="recipe_command", required=True, metavar="COMMAND")
    show = subcommands.add_parser("show", help=SHOW, description=SHOW)
    add_target(show, "recipe", "recipe YAML file")


def run(args: argparse.Namespace) -> None:
    """Print the resolved recipe as YAML."""
    print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
