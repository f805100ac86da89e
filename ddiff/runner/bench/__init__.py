"""``ddiff bench``: train-step throughput, model FLOPs, MFU, compile time and memory of
named shapes, and the cost of every registered sampler.

What is timed is what a run executes: the train step is the
:class:`~ddiff.runner.trainer.engine.Engine`'s own jitted step (``shard_map``, gradient
reduction, AdamW, EMA and finite checks) built from a recipe, as the
:class:`ddiff.runner.Trainer` runs it, and sampling is the engine's jitted sampling loop.
Times are medians over repeated calls after compilation, each ended by
``block_until_ready``.

- Model FLOPs per token of a train step are 3 x the network's forward FLOPs per position
  (:meth:`ddiff.AbstractNetwork.flops_per_token`, a formula stated per network), checked
  against XLA's cost analysis of the compiled step. XLA counts the body of a loop once,
  so the check compiles (without running) the step of the same model with its layer
  stacks unrolled when the timed one scans them.
- MFU is model FLOPs per second over the peak of the shape's compute dtype
  (``precision.compute``; :func:`ddiff.runner.throughput.peak_flops`, on CPU measured
  here, the fastest of ten n x n products in that dtype, n = 1024 and 2048); each
  result names the peak it used (``peak_precision``, ``peak_source``).
- Peak memory is XLA's memory analysis of the compiled step (arguments + outputs -
  aliased + temporaries); a batch that would not fit is refused before it runs.
- Every registered sampler is run on the shape's network (with a process and
  parameterization it accepts, :data:`~ddiff.runner.bench.shapes.FAMILIES`) for
  ``sample_steps`` steps: its cost per network evaluation beside one batched forward
  pass of the same batch, its evaluations per sample, and the host callbacks in its
  compiled loop (0: no host round trip).

Modules: :mod:`~ddiff.runner.bench.shapes` (the catalogue, as data),
:mod:`~ddiff.runner.bench.recipes` (the recipes timed), :mod:`~ddiff.runner.bench.measure`
(the measurements) and :mod:`~ddiff.runner.bench.report` (the table and the JSON file);
the command is :mod:`ddiff.runner.commands.bench`.
"""

from ddiff.runner.bench.measure import bench_peak, bench_sampler, bench_shape, bench_train_step
from ddiff.runner.bench.recipes import BenchError, component_recipe, sampler_section, shape_recipe
from ddiff.runner.bench.shapes import FAMILIES, FLOPS_FORMULAS, REQUIRED_SETTINGS, SHAPES, Shape

__all__ = [
    "FAMILIES",
    "FLOPS_FORMULAS",
    "REQUIRED_SETTINGS",
    "SHAPES",
    "BenchError",
    "Shape",
    "bench_peak",
    "bench_sampler",
    "bench_shape",
    "bench_train_step",
    "component_recipe",
    "sampler_section",
    "shape_recipe",
]
