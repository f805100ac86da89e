"""The report of ``ddiff compile``: per program, memory per device against its HBM, model
and XLA FLOPs, the cost model's time and the MFU it implies, collectives and compile time;
a table for the terminal and a JSON document."""

import dataclasses
import json
from typing import Any

from ddiff.runner.compile.programs import CompiledProgram
from ddiff.runner.memory import format_bytes


@dataclasses.dataclass(frozen=True)
class Target:
    """What the programs were compiled for: the devices' kind and count, each device's
    memory, dense peak FLOP/s in the compute dtype and memory bandwidth (bytes/s; None
    where unknown), and the mesh."""

    name: str
    device_kind: str
    devices: int
    memory_per_device: int
    peak_per_device: float | None
    mesh: dict[str, int]
    compute: str
    bandwidth_per_device: float | None = None


def mfu(program: CompiledProgram, target: Target) -> float | None:
    """Model FLOPs utilisation the cost model implies: model FLOPs of one execution over
    (its time x devices x peak per device)."""
    if program.model_flops is None or program.optimal_seconds is None or not target.peak_per_device:
        return None
    return program.model_flops / (program.optimal_seconds * target.devices * target.peak_per_device)


def roofline_seconds(program: CompiledProgram, target: Target) -> float | None:
    """The roofline's lower bound on one execution's time: the larger of its FLOPs per
    device at the peak and its bytes per device at the memory bandwidth (collectives and
    any stall not counted)."""
    if not target.peak_per_device or not target.bandwidth_per_device or not program.xla_flops:
        return None
    return max(program.xla_flops / target.devices / target.peak_per_device,
               program.bytes_accessed / target.bandwidth_per_device)  # fmt: skip


def roofline_mfu(program: CompiledProgram, target: Target) -> float | None:
    """The MFU at the roofline's time: an upper bound."""
    seconds = roofline_seconds(program, target)
    if program.model_flops is None or seconds is None:
        return None
    return program.model_flops / (seconds * target.devices * target.peak_per_device)


def program_record(program: CompiledProgram, target: Target) -> dict[str, Any]:
    """One program's report as JSON-ready values."""
    record = dataclasses.asdict(program)
    record["collectives"] = [dataclasses.asdict(collective) for collective in program.collectives]
    record["device_bytes"] = program.device_bytes
    record["fits"] = program.refused is None and program.device_bytes <= target.memory_per_device
    record["memory_fraction"] = program.device_bytes / target.memory_per_device
    record["mfu"] = mfu(program, target)
    record["roofline_seconds"] = roofline_seconds(program, target)
    record["roofline_mfu"] = roofline_mfu(program, target)
    return record


def report_json(programs: list[CompiledProgram], target: Target, **context: Any) -> str:
    """The whole report as indented JSON: ``context`` (recipe, overrides, versions), the
    target and every program."""
    payload = {
        **context,
        "target": dataclasses.asdict(target),
        "programs": [program_record(program, target) for program in programs],
    }
    return json.dumps(payload, indent=2) + "\n"


def _flops(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def header(target: Target) -> str:
    """The line above the table: the devices, their memory and peak, the mesh."""
    peak = "unknown peak" if target.peak_per_device is None else f"{_flops(target.peak_per_device)}FLOP/s {target.compute} peak"
    mesh = " x ".join(f"{axis}={size}" for axis, size in target.mesh.items())
    return (
        f"{target.name}: {target.devices} x {target.device_kind} ({format_bytes(target.memory_per_device)}, "
        f"{peak} each), mesh {mesh}"
    )


COLUMNS = ("program", "batch", "memory/device", "of memory", "args", "temps", "model FLOPs", "XLA FLOPs",
           "time (cost model)", "MFU", "roofline", "MFU bound", "compile")  # fmt: skip


def table(programs: list[CompiledProgram], target: Target) -> str:
    """The report as aligned text: one row per program, then one line per program
    listing its collectives."""
    rows = [COLUMNS]
    for program in programs:
        utilisation = mfu(program, target)
        rows.append((
            program.name,
            str(program.batch),
            (">" if program.refused else "") + format_bytes(program.device_bytes),
            f"{program.device_bytes / target.memory_per_device:.0%}",
            format_bytes(program.argument_bytes),
            format_bytes(program.temp_bytes),
            _flops(program.model_flops),
            _flops(program.xla_flops),
            _seconds(program.optimal_seconds),
            "-" if utilisation is None else f"{utilisation:.1%}",
            _seconds(roofline_seconds(program, target)),
            "-" if roofline_mfu(program, target) is None else f"{roofline_mfu(program, target):.1%}",
            f"{program.compile_seconds:.1f} s",
        ))  # fmt: skip
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    lines = [header(target)]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    for program in programs:
        if program.refused is not None:
            lines.append(f"{program.name} refused by the compiler: {program.refused}")
            continue
        parts = [f"{c.kind} x{c.count} ({format_bytes(c.bytes)})" for c in program.collectives] or ["none"]
        lines.append(f"collectives per {program.name}: {', '.join(parts)}")
    return "\n".join(lines)
