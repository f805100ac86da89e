"""``ddiff plot``: training-loss and evaluation curves of a run directory as a PNG."""

import json
import os
from pathlib import Path
from typing import Any

from ddiff._data import METRICS
from ddiff._errors import RunDirectoryError

PLOT_FILE = "curves.png"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """Whether the file ``path`` begins with the 8-byte PNG signature."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def metric_lines(path: Path) -> tuple[list[tuple[int, str, dict[str, Any]]], bool]:
    """(line number, line, record) of each record of a metrics.jsonl, and whether its last
    line was cut short (no newline and not JSON: a run killed while writing it), which is
    left out.

    Raises:
        RunDirectoryError: the file is missing or unreadable, or another line is not a
            JSON object with an integer ``step``.
    """
    if not path.exists():
        raise RunDirectoryError(f"{path} does not exist; train first with ddiff run")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise RunDirectoryError(f"cannot read {path} ({error.strerror})") from None
    lines = text.splitlines()
    records = []
    cut_short = False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            if number == len(lines) and not text.endswith("\n"):
                cut_short = True
                continue
            message = getattr(error, "msg", str(error))
            raise RunDirectoryError(
                f"{path}, line {number}: not JSON ({message}); remove or repair that line"
            ) from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise RunDirectoryError(
                f"{path}, line {number}: not a metrics record (a JSON object with an integer "
                f"step); remove or repair that line"
            )
        records.append((number, line, record))
    return records, cut_short


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a last line cut short by a kill left out),
    refusing any other line that is not a metrics record."""
    records, _ = metric_lines(path)
    return [record for _, _, record in records]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def eval_unit(records: list[dict[str, Any]]) -> str:
    """The unit to plot for evaluations: the data's metric when recorded, else bits/token."""
    for metric in METRICS[1:]:
        if any(metric in r for r in records):
            return metric
    return "bits_per_token"


def in_unit(bits_per_token: float, unit: str) -> float:
    """Bits per token expressed in ``unit`` (perplexity is 2 ** bits)."""
    return 2.0**bits_per_token if unit == "perplexity" else bits_per_token


def plot_run(workdir: str | Path, output: str | Path | None = None) -> Path:
    """Draw the training loss (nats per sequence), and the negative ELBO of the training
    batches and of the held-out evaluations (in the data's unit, with standard-error
    bars) against the step; write ``curves.png``.

    Returns:
        The path of the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    path = workdir / "metrics.jsonl"
    lines, _ = metric_lines(path)
    train = [r for _, _, r in lines if r.get("split") == "train" and "loss" in r]
    evals = [r for _, _, r in lines if r.get("split") == "eval"]
    unit = eval_unit(evals)
    for number, _, record in lines:
        wanted = {"train": ("loss",), "eval": (unit,)}.get(record.get("split"), ())
        for key in wanted:
            if not _is_number(record.get(key)):
                raise RunDirectoryError(
                    f"{path}, line {number}: {record['split']} record of step {record['step']} "
                    f"has no number {key}; remove or repair that line"
                )
    if not train and not evals:
        raise RunDirectoryError(f"{workdir}/metrics.jsonl has no train or eval records yet")
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    left.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.0)
    left.set(xlabel="step", ylabel="loss (nats per sequence)", title="training loss")
    estimates = [r for r in train if _is_number(r.get("bits_per_token"))]
    right.plot(
        [r["step"] for r in estimates],
        [in_unit(r["bits_per_token"], unit) for r in estimates],
        lw=1.0,
        alpha=0.5,
        label="training batches",
    )
    if evals:
        right.errorbar(
            [r["step"] for r in evals],
            [r[unit] for r in evals],
            yerr=[r[f"{unit}_stderr"] if _is_number(r.get(f"{unit}_stderr")) else 0.0 for r in evals],
            marker="o",
            capsize=3,
            label="held out (± standard error)",
        )
    right.legend()
    right.set(xlabel="step", ylabel=unit.replace("_", " "), title="negative ELBO")
    for axes in (left, right):
        axes.grid(alpha=0.3)
    figure.suptitle(str(workdir))
    path = Path(output) if output else workdir / PLOT_FILE
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        figure.savefig(temporary, dpi=100)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)
    return path
