"""The collectives of a compiled program, read from its optimised HLO text: per kind, how
many run in one execution and how many bytes they produce, counting an instruction
inside a loop body once per iteration (the loop's known trip count)."""

import collections
import dataclasses
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
"""The cross-device operations reported (an asynchronous ``-start`` counts as its kind)."""

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_COMMENT = re.compile(r"/\*.*?\*/")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective in a program: executions per run and bytes they produce."""

    kind: str
    count: int
    bytes: float


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO result shape (an array or a tuple of arrays)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in DTYPE_BYTES:
            size = 1
            for dim in filter(None, dims.split(",")):
                size *= int(dim)
            total += DTYPE_BYTES[dtype] * size
    return total


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of :data:`COLLECTIVES` in the optimised HLO ``hlo_text``, with its
    executions per run: an instruction in computation c runs as often as c is called,
    which is the product of the trip counts of the loops around it."""
    computations: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        line = _COMMENT.sub("", line)
        header = _COMPUTATION.match(line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            computations[current] = []
            if line.lstrip().startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() != "}":
            computations[current].append(line)
    if entry is None:
        return []
    runs: collections.Counter[str] = collections.Counter()

    def visit(name: str, times: int, depth: int = 0) -> None:
        if name not in computations or depth > 64:
            return
        runs[name] += times
        for line in computations[name]:
            trip = _TRIP.search(line)
            repeat = int(trip.group(1)) if trip and " while(" in line else 1
            called = _CALLED.findall(line)
            for branches in _BRANCHES.findall(line):
                called += [branch.strip().lstrip("%") for branch in branches.split(",")]
            for callee in called:
                visit(callee, times * repeat, depth + 1)

    visit(entry, 1)
    counts: collections.Counter[str] = collections.Counter()
    sizes: collections.Counter[str] = collections.Counter()
    for name, times in runs.items():
        for line in computations[name]:
            instruction = _INSTRUCTION.match(line)
            if instruction is None:
                continue
            shape, opcode = instruction.group(1), instruction.group(2)
            kind = opcode.removesuffix("-start")
            if kind in COLLECTIVES:
                counts[kind] += times
                sizes[kind] += times * shape_bytes(shape)
    return [Collective(kind, counts[kind], sizes[kind]) for kind in COLLECTIVES if counts[kind]]
