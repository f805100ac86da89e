"""The paper recipes at the papers' scale, compiled for TPU topologies from this machine
(``ddiff compile``'s path; libtpu: ``pip install -e '.[tpu]'``): per configuration the
train step's memory per chip, the cost model's step time and the MFU it implies, as the
table of docs/performance.md. Each configuration is a recipe, overrides, a topology and a
mesh; nothing is allocated and nothing runs. Run:

    python benchmarks/tpu_scale.py --output-dir tpu-scale [--only md4-s-v5p8-splash ...] [--reuse]

Each configuration's report goes to DIR/LABEL.json (``ddiff compile --output``'s
format), and the table is printed as Markdown at the end.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

BF16 = ("precision.compute=bfloat16",)
EVAL = ("eval.batch_size=256",)


@dataclasses.dataclass(frozen=True)
class Configuration:
    """One row: ``recipe`` with ``overrides`` on ``topology`` with ``mesh`` (AXIS=SIZE,...),
    and further ``ddiff compile`` ``options``."""

    label: str
    recipe: str
    overrides: tuple[str, ...]
    topology: str
    mesh: str
    options: tuple[str, ...] = ()


CONFIGURATIONS = (
    Configuration("md4-s-v5p8-einsum", "recipes/md4_openwebtext.yaml", (*BF16, "network.attention=einsum"),
                  "v5p:2x2x1", "data=4"),
    Configuration("md4-s-v5p8-splash", "recipes/md4_openwebtext.yaml", (*BF16, "network.attention=splash"),
                  "v5p:2x2x1", "data=4"),
    Configuration("md4-s-v5p8-splash-remat-dots", "recipes/md4_openwebtext.yaml",
                  (*BF16, "network.attention=splash", "network.remat=dots"), "v5p:2x2x1", "data=4"),
    Configuration("md4-s-v5p8-splash-remat-block", "recipes/md4_openwebtext.yaml",
                  (*BF16, "network.attention=splash", "network.remat=block"), "v5p:2x2x1", "data=4"),
    Configuration("md4-s-v5p64-splash", "recipes/md4_openwebtext.yaml", (*BF16, "network.attention=splash"),
                  "v5p:4x4x2", "data=32"),
    Configuration("md4-s-v5e16-splash-remat-dots", "recipes/md4_openwebtext.yaml",
                  (*BF16, "network.attention=splash", "network.remat=dots"), "v5e:4x4", "data=16"),
    Configuration("md4-s-v5e16-splash-remat-block", "recipes/md4_openwebtext.yaml",
                  (*BF16, "network.attention=splash", "network.remat=block"), "v5e:4x4", "data=16"),
    Configuration("md4-s-v5e8-b64-splash", "recipes/md4_openwebtext.yaml",
                  (*BF16, "network.attention=splash", "trainer.batch_size=64"), "v5e:2x4", "data=8"),
    Configuration("md4-s-v5e8-b128-splash", "recipes/md4_openwebtext.yaml",
                  (*BF16, "network.attention=splash", "trainer.batch_size=128"), "v5e:2x4", "data=8"),
    Configuration("md4-s-v5e64-splash", "recipes/md4_openwebtext.yaml", (*BF16, "network.attention=splash"),
                  "v5e:8x8", "data=64"),
    Configuration("genmd4-s-v5p8-splash", "recipes/genmd4_openwebtext.yaml", (*BF16, "network.attention=splash"),
                  "v5p:2x2x1", "data=4"),
    Configuration("genmd4-s-v5p64-splash", "recipes/genmd4_openwebtext.yaml", (*BF16, "network.attention=splash"),
                  "v5p:4x4x2", "data=32"),
    Configuration("bd3lm-l4-v5p8-splash", "recipes/bd3lm_openwebtext_l4.yaml", (*BF16, "network.attention=splash"),
                  "v5p:2x2x1", "data=4"),
    Configuration("bd3lm-l4-v5p64-einsum", "recipes/bd3lm_openwebtext_l4.yaml", (*BF16, "network.attention=einsum"),
                  "v5p:4x4x2", "data=32"),
    Configuration("bd3lm-l4-v5p64-splash", "recipes/bd3lm_openwebtext_l4.yaml", (*BF16, "network.attention=splash"),
                  "v5p:4x4x2", "data=32"),
    # The UNets' 32 and 24 residual blocks each way take tens of minutes to compile traced
    # out on two cores: memory and collectives only.
    Configuration("md4-cifar10-v5e16", "recipes/md4_cifar10.yaml", (*BF16, *EVAL), "v5e:4x4", "data=16",
                  ("--memory-only",)),
    Configuration("md4-cifar10-v5e16-remat-block", "recipes/md4_cifar10.yaml", (*BF16, *EVAL, "network.remat=block"),
                  "v5e:4x4", "data=16", ("--memory-only",)),
    Configuration("md4-cifar10-v5p8", "recipes/md4_cifar10.yaml", (*BF16, *EVAL), "v5p:2x2x1", "data=4",
                  ("--memory-only",)),
    Configuration("md4-imagenet64-v5p8", "recipes/md4_imagenet64.yaml", (*BF16, *EVAL), "v5p:2x2x1", "data=4",
                  ("--memory-only",)),
    Configuration("md4-imagenet64-v5p64", "recipes/md4_imagenet64.yaml", (*BF16, *EVAL), "v5p:4x4x2", "data=32",
                  ("--memory-only",)),
    Configuration("md4-imagenet64-v5p64-remat-block", "recipes/md4_imagenet64.yaml",
                  (*BF16, *EVAL, "network.remat=block"), "v5p:4x4x2", "data=32", ("--memory-only",)),
)  # fmt: skip
"""The table's rows."""


def compile_configuration(configuration: Configuration, output: Path) -> dict:
    """Compile ``configuration``'s train step; its report (as ``ddiff compile --output``)."""
    from ddiff.runner.cli import main

    status = main([
        "compile", configuration.recipe, *configuration.overrides, "--topology", configuration.topology,
        "--mesh", configuration.mesh, "--programs", "train_step", "--output", str(output), "--overwrite",
        *configuration.options,
    ])  # fmt: skip
    report = json.loads(output.read_text()) if output.exists() else {}
    report["status"] = status
    return report


def _roofline(report: dict, train: dict) -> float | None:
    """The roofline's time of the train step (as ``ddiff compile`` reports it), from the
    report's FLOPs and bytes and the generation's data sheet."""
    from ddiff.runner.compile.topology import GENERATIONS

    generation = GENERATIONS[report["target"]["name"].split(":")[0]]
    devices = report["target"]["devices"]
    if not train["xla_flops"]:
        return None
    return max(train["xla_flops"] / devices / generation.peak_flops, train["bytes_accessed"] / generation.hbm_bandwidth)


def markdown_row(configuration: Configuration, report: dict) -> str:
    """The configuration's line of the table."""
    if not report.get("programs"):
        return f"| {configuration.label} | {configuration.topology} | {configuration.mesh} | failed ({report.get('status')}) |"
    (train,) = report["programs"]
    target = report["target"]
    gib = train["device_bytes"] / 1024**3
    memory = f"{'>' if train['refused'] else ''}{gib:.1f} GiB ({train['memory_fraction']:.0%})"
    step = "-" if train["optimal_seconds"] is None else f"{train['optimal_seconds'] * 1e3:.0f} ms"
    mfu = "-" if train["mfu"] is None else f"{train['mfu']:.1%}"
    roofline = _roofline(report, train)
    bound = "-"
    if roofline is not None and train["model_flops"]:
        bound = f"{train['model_flops'] / (roofline * target['devices'] * target['peak_per_device']):.0%}"
    roofline_text = "-" if roofline is None else f"{roofline * 1e3:.0f} ms"
    extra = " ".join(o.removeprefix("network.") for o in configuration.overrides if not o.startswith(("precision", "eval")))
    return (
        f"| {configuration.label} | {configuration.topology} ({target['devices']} chips) | {configuration.mesh} "
        f"| {extra or '-'} | {train['batch']} | {memory} | {step} | {mfu} | {roofline_text} | {bound} "
        f"| {train['compile_seconds']:.0f} s |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--only", nargs="*", help="labels to compile (default: all)")
    parser.add_argument("--reuse", action="store_true", help="take the reports already in --output-dir as they are")
    args = parser.parse_args()
    directory = Path(args.output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    chosen = [c for c in CONFIGURATIONS if not args.only or c.label in args.only]
    rows = []
    for configuration in chosen:
        output = directory / f"{configuration.label}.json"
        if args.reuse and output.exists():
            report = json.loads(output.read_text())
        else:
            report = compile_configuration(configuration, output)
        rows.append(markdown_row(configuration, report))
        print(rows[-1], flush=True)
    print("| configuration | topology | mesh | settings | batch | memory per chip | step (cost model) | MFU | "
          "step (roofline) | MFU bound | compile |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
