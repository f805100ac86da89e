"""``ddiff recipe show RECIPE``: print a recipe fully resolved, every default filled in."""

import argparse

from ddiff.runner.commands.options import OVERRIDES_HELP, add_command
from ddiff.runner.recipe import load_recipe


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The ``recipe`` command's parser, with its subcommand ``show``."""
    parser = add_command(commands, "recipe", "inspect recipes")
    subcommands = parser.add_subparsers(dest="recipe_command", required=True, metavar="COMMAND")
    show = add_command(subcommands, "show", "print the fully resolved recipe")
    show.add_argument("recipe", help="recipe YAML file")
    show.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    show.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> None:
    """Print the resolved recipe as YAML."""
    print(load_recipe(args.recipe, args.overrides).to_yaml(), end="")
