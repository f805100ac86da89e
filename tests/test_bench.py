"""``ddiff bench`` at the tiny shape writes every field (no timing is asserted: speed
targets belong to the benchmark itself), refuses bad input in one line, and runs report
tokens/s and MFU in metrics.jsonl. The suite sets DDIFF_PEAK_FLOPS=1e11 (conftest)."""

import json
import types

import jax.numpy as jnp
import pytest

import ddiff.runner
from ddiff.runner import model as model_module
from ddiff.runner import throughput
from ddiff.runner.bench import SHAPES, measure, shape_recipe

PEAK = 1e11

# The tiny shape: MD4 transformer, width 32, 2 blocks, L=16, V=5 (5 output channels),
# feed-forward width 32 * ceil(int(8 * 32 / 3) / 32) = 96. Per-position matrix weights
# N = 2 * (4 * 32^2 + 3 * 32 * 96) + 32 * 5 = 26,784; a train step's model FLOPs per
# token are 3 * (2 N + 4 L d T) = 3 * (53,568 + 4 * 2 * 32 * 16) = 172,992.
TINY_FLOPS_PER_TOKEN = 172_992.0

RUN_KEYS = {
    "backend", "device_kind", "device_count", "jax_version", "load_average", "precision", "peak_flops",
    "peak_source", "results",
}  # fmt: skip
RESULT_KEYS = {
    "shape", "description", "network", "precision", "batch_size", "seq_len", "vocab_size", "parameters",
    "flops_per_token", "forward_flops_per_token", "flops_formula", "model_flops_per_step", "step_seconds",
    "step_times", "compile_seconds", "tokens_per_second", "xla_flops_per_step", "xla_check_program", "memory",
    "xla_over_model_flops", "peak_flops", "peak_precision", "peak_source", "mfu", "sampling",
}  # fmt: skip
MEMORY_KEYS = {
    "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes", "peak_bytes",
}  # fmt: skip
SAMPLER_KEYS = {
    "family", "settings", "batch", "evaluations_per_sample", "sample_seconds", "seconds_per_evaluation",
    "forward_seconds", "evaluation_over_forward", "host_callbacks", "loops", "compile_seconds", "peak_bytes",
}  # fmt: skip


def test_bench_at_the_tiny_shape_writes_every_field(tmp_path, capsys):
    output = tmp_path / "bench.json"
    args = ["bench", "tiny", "--repeats", "1", "--samplers", "ancestral", "--output", str(output)]
    assert ddiff.runner.main(args) == 0
    shown = capsys.readouterr().out
    assert "tiny: MD4 transformer" in shown and "sampler ancestral" in shown and "MFU" in shown
    run = json.loads(output.read_text())
    assert set(run) == RUN_KEYS
    assert (run["backend"], run["precision"], run["peak_flops"], run["peak_source"]) == ("cpu", "float32", PEAK, "DDIFF_PEAK_FLOPS")
    (result,) = run["results"]
    assert set(result) == RESULT_KEYS
    assert (result["batch_size"], result["seq_len"], result["vocab_size"]) == (4, 16, 5)
    assert result["flops_per_token"] == TINY_FLOPS_PER_TOKEN == 3 * result["forward_flops_per_token"]
    assert result["model_flops_per_step"] == TINY_FLOPS_PER_TOKEN * 4 * 16
    assert result["tokens_per_second"] == pytest.approx(4 * 16 / result["step_seconds"], rel=1e-12)
    assert result["mfu"] == pytest.approx(result["model_flops_per_step"] / result["step_seconds"] / PEAK, rel=1e-12)
    assert (result["peak_flops"], result["peak_precision"], result["peak_source"]) == (PEAK, "float32", "DDIFF_PEAK_FLOPS")
    assert "of the float32 peak 100 GFLOP/s (DDIFF_PEAK_FLOPS)" in shown
    # XLA also counts the element-wise work the formula leaves out, a large share at this size.
    assert 1.0 < result["xla_over_model_flops"] < 2.0
    assert result["xla_check_program"] == "train step (the one timed)"
    memory = result["memory"]
    assert set(memory) == MEMORY_KEYS
    assert memory["peak_bytes"] == (
        memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] - memory["alias_size_in_bytes"]
        + memory["temp_size_in_bytes"]
    ) > 0  # fmt: skip
    assert result["compile_seconds"] > 0 and len(result["step_times"]) == 1
    sampler = result["sampling"]["ancestral"]
    assert set(sampler) == SAMPLER_KEYS
    assert (sampler["family"], sampler["settings"], sampler["batch"]) == ("recipe", {"steps": 4, "grid": "uniform", "transforms": []}, 2)
    # The linear schedule unmasks every position by t = 0: one evaluation per step.
    assert sampler["evaluations_per_sample"] == 4
    assert sampler["host_callbacks"] == 0 and sampler["loops"] == ["scan"]
    assert sampler["seconds_per_evaluation"] == pytest.approx(sampler["sample_seconds"] / 4, rel=1e-12)
    assert sampler["evaluation_over_forward"] == pytest.approx(
        sampler["seconds_per_evaluation"] / sampler["forward_seconds"], rel=1e-12
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["nope"], "unknown shape 'nope'; known shapes: md4-text8-small, md4-s, cifar-unet, tiny"),
        (["tiny", "--samplers", "nope"], "unknown sampler 'nope'; registered:"),
        (["tiny", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["tiny", "--set", "network.depth=0"], "network.depth"),
    ],
)
def test_bench_bad_input_is_one_line(args, fragment, capsys):
    assert ddiff.runner.main(["bench", *args]) == 2
    error = capsys.readouterr().err
    assert fragment in error and error.count("\n") == 1 and "Traceback" not in error


def test_bench_refuses_a_precision_the_backend_cannot_run(monkeypatch, capsys):
    monkeypatch.setattr(model_module, "_PROBED", {})
    monkeypatch.setattr(model_module, "_probe", lambda compute: f"UNIMPLEMENTED: {compute} dot")
    assert ddiff.runner.main(["bench", "tiny", "--precision", "bfloat16"]) == 2
    error = capsys.readouterr().err
    assert error == (
        "ddiff: error: bench shape tiny: precision.compute: bfloat16 compute cannot run on this cpu "
        "backend (UNIMPLEMENTED: bfloat16 dot); set precision.compute: float32\n"
    )


def test_bfloat16_mfu_is_against_the_measured_bfloat16_peak(monkeypatch, tmp_path, capsys):
    """Without DDIFF_PEAK_FLOPS on CPU the bench measures the peak with products in the
    compute dtype (here a stand-in: 100 GFLOP/s in float32, 400 in bfloat16), and MFU at
    --precision bfloat16 is against the bfloat16 peak, named in the line and the file."""
    measured = []

    def stand_in(dtype, *, size, repeats):
        measured.append(jnp.dtype(dtype).name)
        return {"float32": 1e11, "bfloat16": 4e11}[jnp.dtype(dtype).name]

    monkeypatch.delenv("DDIFF_PEAK_FLOPS")
    monkeypatch.setattr(measure, "measure_matmul_peak", stand_in)
    monkeypatch.setattr(measure, "_MEASURED_PEAKS", {})
    output = tmp_path / "bench.json"
    args = ["bench", "tiny", "--precision", "bfloat16", "--repeats", "1", "--samplers", "--output", str(output)]
    assert ddiff.runner.main(args) == 0
    shown = capsys.readouterr().out
    assert set(measured) == {"bfloat16"} and len(measured) == 2  # n = 1024 and 2048, once
    assert "cpu (cpu) bfloat16 peak 400.0 GFLOP/s (measured)" in shown
    assert "of the bfloat16 peak 400 GFLOP/s (measured)" in shown
    run = json.loads(output.read_text())
    assert (run["precision"], run["peak_flops"], run["peak_source"]) == ("bfloat16", 4e11, "measured")
    (result,) = run["results"]
    assert (result["precision"], result["peak_precision"], result["peak_flops"]) == ("bfloat16", "bfloat16", 4e11)
    assert result["mfu"] == pytest.approx(result["model_flops_per_step"] / result["step_seconds"] / 4e11, rel=1e-12)


def test_peaks_are_those_of_the_compute_dtype(monkeypatch):
    """The table of known devices is read by compute dtype (a stand-in device kind), and
    DDIFF_PEAK_FLOPS gives one number for every dtype or one per dtype."""
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
    monkeypatch.delenv("DDIFF_PEAK_FLOPS")
    assert throughput.peak_flops("bfloat16", h100) == (989e12, "table: H100")
    assert throughput.peak_flops("float32", h100) == (494e12, "table: H100")
    assert throughput.peak_flops("float16", tpu) == (
        None, "no known float16 peak for 'TPU v5 lite'; set DDIFF_PEAK_FLOPS"
    )
    monkeypatch.setenv("DDIFF_PEAK_FLOPS", "float32=494e12, bfloat16=989e12")
    assert throughput.peak_flops("bfloat16", h100) == (989e12, "DDIFF_PEAK_FLOPS (bfloat16)")
    assert throughput.peak_flops("float32") == (494e12, "DDIFF_PEAK_FLOPS (float32)")
    assert throughput.peak_flops("float16") == (
        None, "DDIFF_PEAK_FLOPS='float32=494e12, bfloat16=989e12' gives no float16 peak"
    )
    monkeypatch.setenv("DDIFF_PEAK_FLOPS", "bfloat16=fast")
    assert throughput.peak_flops("bfloat16") == (
        None, "DDIFF_PEAK_FLOPS='bfloat16=fast': 'bfloat16=fast' is not dtype=number"
    )
    monkeypatch.setenv("DDIFF_PEAK_FLOPS", "2e11")
    assert throughput.peak_flops("bfloat16", h100) == (2e11, "DDIFF_PEAK_FLOPS")


def test_every_shape_builds_without_a_vocabulary_sized_table():
    """md4-s's 50,257 symbols come from random_tokens, which builds nothing of V x V (a
    Markov source of that size is refused as 113 GiB of work tables)."""
    for shape in SHAPES.values():
        recipe = shape_recipe(shape)
        assert recipe.names["data"] == "random_tokens"
        assert recipe.data.vocab_size == shape.recipe["data"]["num_symbols"]
    md4_s = shape_recipe(SHAPES["md4-s"])
    assert (md4_s.data.vocab_size, md4_s.data.seq_len) == (50257, 1024)


def test_bench_refuses_what_does_not_fit_before_running(monkeypatch, capsys):
    """With 1 MiB available, the tiny shape's parameters, EMA and Adam moments (89,184
    float32 parameters, 4 copies: 1.4 MB) are refused before anything is allocated; with
    2 MiB, its train step (XLA memory analysis of the step compiled from the abstract
    state, before the state is allocated) is."""
    monkeypatch.setattr(measure, "available_bytes", lambda: 2**20)
    assert ddiff.runner.main(["bench", "tiny", "--samplers"]) == 2
    assert capsys.readouterr().err == (
        "ddiff: error: not enough memory for the parameters, EMA and Adam moments of bench shape "
        "tiny: about 1.4 MiB needed (4 x the float32 parameters), 1.0 MiB available; choose a "
        "smaller shape or a machine with more memory\n"
    )
    monkeypatch.setattr(measure, "available_bytes", lambda: 2 * 2**20)
    monkeypatch.setattr(measure, "median_time", lambda *_, **__: pytest.fail("ran a step that does not fit"))
    monkeypatch.setattr(measure, "memory_of", lambda _: dict.fromkeys(MEMORY_KEYS, 0) | {"temp_size_in_bytes": 8 * 2**20, "peak_bytes": 8 * 2**20})
    assert ddiff.runner.main(["bench", "tiny", "--samplers"]) == 2
    assert capsys.readouterr().err == (
        "ddiff: error: not enough memory for the train step of bench shape tiny at batch 4: about "
        "8.0 MiB needed (XLA memory analysis, compiled before allocating), 2.0 MiB available; lower "
        "--batch-size (about 1 may fit)\n"
    )


def test_runs_log_tokens_per_second_and_mfu(full_run):
    """Every train line of metrics.jsonl has tokens/s and MFU = tokens/s x model FLOPs per
    token / peak, the FLOPs counted here by hand: the tiny quickstart transformer (width
    16, 1 block, MLP width 32, 5 outputs, L=8) has per-position weights N = 3 * 16^2 +
    16^2 + 2 * 16 * 32 + 16 * 5 = 2,128, so 3 * (2 N + 4 * 1 * 16 * 8) = 14,304 per token."""
    workdir, _ = full_run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [record for record in records if record["split"] == "train"]
    assert train
    for record in train:
        assert record["tokens_per_second"] > 0
        assert record["mfu"] == pytest.approx(record["tokens_per_second"] * 14_304 / PEAK, rel=1e-12)
