"""Ahead-of-time compilation of a recipe's programs for TPU topologies (or this machine)
from abstract state, and what the compiler reports of them (``ddiff compile``)."""

from ddiff.runner.compile.hlo import Collective, collectives
from ddiff.runner.compile.programs import (
    PROGRAMS,
    CompiledProgram,
    compile_program,
    compile_recipe,
)
from ddiff.runner.compile.report import Target, mfu, report_json, table
from ddiff.runner.compile.topology import (
    GENERATIONS,
    INSTALL_COMMAND,
    Generation,
    Topology,
    load_topology,
)
from ddiff.runner.trainer.ahead import AheadOfTime

__all__ = [
    "GENERATIONS",
    "INSTALL_COMMAND",
    "PROGRAMS",
    "AheadOfTime",
    "Collective",
    "CompiledProgram",
    "Generation",
    "Target",
    "Topology",
    "collectives",
    "compile_program",
    "compile_recipe",
    "load_topology",
    "mfu",
    "report_json",
    "table",
]
