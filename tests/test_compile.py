"""``ddiff compile``: a recipe's programs compiled ahead of time from abstract state, for
a TPU topology (libtpu, installed by the test command) and for this machine's 8
simulated devices, and its refusals."""

import importlib.util
import json

import jax
import numpy as np
import pytest

import ddiff.runner
from ddiff.runner.cli import main
from ddiff.runner.compile import PROGRAMS, collectives, compile_recipe
from ddiff.runner.compile.hlo import shape_bytes
from ddiff.runner.mesh import make_mesh

QUICKSTART = "recipes/quickstart.yaml"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")

RECORD_FIELDS = {
    "name", "batch", "argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes",
    "xla_flops", "bytes_accessed", "optimal_seconds", "model_flops", "collectives", "compile_seconds",
    "refused", "device_bytes", "fits", "memory_fraction", "mfu", "roofline_seconds", "roofline_mfu",
}  # fmt: skip


def _one_line(capsys, status, expected):
    captured = capsys.readouterr()
    assert status == 2, captured
    assert captured.err.startswith("ddiff: error: ") and captured.err.count("\n") == 1, captured.err
    assert expected in captured.err, captured.err
    return captured.err


@pytest.fixture(scope="module")
def tpu_report(tiny_overrides, tmp_path_factory):
    """The JSON report of the tiny recipe's three programs compiled for v5e:2x2 (4 chips)
    on a data x fsdp = 2 x 2 mesh."""
    output = tmp_path_factory.mktemp("compile") / "report.json"
    status = main([
        "compile", QUICKSTART, *tiny_overrides, "--topology", "v5e:2x2", "--mesh", "data=2,fsdp=2",
        "--output", str(output),
    ])  # fmt: skip
    assert status == 0
    return json.loads(output.read_text())


@needs_libtpu
def test_tiny_recipe_compiles_for_a_tpu_topology_with_every_field(tpu_report):
    target = tpu_report["target"]
    assert target["device_kind"] == "TPU v5 lite" and target["devices"] == 4
    assert target["memory_per_device"] == 16 * 1024**3 and target["peak_per_device"] == 197e12
    assert target["mesh"] == {"data": 2, "fsdp": 2, "model": 1} and target["bandwidth_per_device"] == 819e9
    records = {record["name"]: record for record in tpu_report["programs"]}
    assert list(records) == list(PROGRAMS)
    for record in records.values():
        assert set(record) == RECORD_FIELDS
        assert record["refused"] is None
        assert record["fits"] and 0 < record["device_bytes"] < target["memory_per_device"]
        assert record["argument_bytes"] > 0 and record["xla_flops"] > 0 and record["optimal_seconds"] > 0
    train = records["train_step"]
    assert train["batch"] == 8 and records["eval_step"]["batch"] == 16
    # Donated: the new state is written over the old one.
    assert train["alias_bytes"] > 0
    # Data parallelism reduces gradients across the mesh; the model FLOPs are 3 x the
    # forward FLOPs of 8 x 8 tokens, and the cost model's time implies an MFU in (0, 1].
    kinds = {collective["kind"] for collective in train["collectives"]}
    assert "all-reduce" in kinds
    assert train["model_flops"] > 0 and 0 < train["mfu"] <= 1
    assert records["eval_step"]["mfu"] is None
    # The roofline: FLOPs per chip at 197 TFLOP/s or bytes per chip at 819 GB/s, the larger.
    bound = max(train["xla_flops"] / 4 / 197e12, train["bytes_accessed"] / 819e9)
    assert train["roofline_seconds"] == pytest.approx(bound, rel=1e-12)
    assert train["roofline_mfu"] == pytest.approx(train["model_flops"] / (bound * 4 * 197e12), rel=1e-12)


@needs_libtpu
def test_the_table_names_every_program(tiny_overrides, capsys):
    assert main(["compile", QUICKSTART, *tiny_overrides, "--topology", "v5e:2x2", "--mesh", "data=4",
                 "--programs", "sample"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "v5e:2x2: 4 x TPU v5 lite" in out and "collectives per sample" in out
    assert "train_step" not in out


@needs_libtpu
def test_a_program_too_large_for_a_chip_is_one_line_after_the_report(tiny_overrides, capsys):
    # 2^22 sequences of 8 tokens: about 40 GiB of logits and activations per chip of 16 GiB.
    status = main(["compile", QUICKSTART, *tiny_overrides, "trainer.batch_size=4194304", "--topology", "v5e:2x2",
                   "--mesh", "data=4", "--programs", "train_step"])  # fmt: skip
    captured = capsys.readouterr()
    assert status == 2 and "train_step" in captured.out
    assert captured.err.count("\n") == 1 and "per device" in captured.err
    assert "mesh.fsdp" in captured.err and "network.remat" in captured.err and "trainer.batch_size" in captured.err


def test_compiles_for_this_machines_devices_from_abstract_state(tiny_overrides):
    """No topology: the 8 simulated CPU devices, data x fsdp = 4 x 2; the state is never
    allocated (the programs take ShapeDtypeStructs)."""
    recipe = ddiff.runner.load_recipe(QUICKSTART, [*tiny_overrides, "mesh.data=4", "mesh.fsdp=2", "network.dim=32"])
    mesh = make_mesh(recipe.mesh, jax.devices())
    (train,) = compile_recipe(recipe, mesh, programs=("train_step",), count_cost=False)
    assert train.argument_bytes > 0 and train.alias_bytes > 0
    # --memory-only: the sharded stack scans, and its cost is not counted at all.
    assert train.xla_flops == 0 and train.optimal_seconds is None
    kinds = {collective.kind for collective in train.collectives}
    assert "all-gather" in kinds  # fsdp gathers the sharded parameters


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--topology", "v9x:2x2"], "unknown TPU generation 'v9x'"),
        (["--topology", "v5p:2x2"], "a v5p topology has 3 sizes"),
        (["--topology", "banana"], "not a topology name"),
        (["--mesh", "data=2,pipeline=2"], "'pipeline=2' is not AXIS=SIZE"),
    ],
)
def test_bad_topologies_and_meshes_are_one_line(arguments, expected, tiny_overrides, capsys):
    error = _one_line(capsys, main(["compile", QUICKSTART, *tiny_overrides, *arguments]), expected)
    if "topology" in arguments[0]:
        assert "v5e:2x2" in error and "v5p:2x2x1" in error  # the known ones are listed


@needs_libtpu
def test_a_mesh_or_batch_that_does_not_split_is_one_line(tiny_overrides, capsys):
    _one_line(capsys, main(["compile", QUICKSTART, *tiny_overrides, "--topology", "v5e:2x2", "--mesh",
                            "data=3,fsdp=1"]), "mesh")  # fmt: skip
    _one_line(capsys, main(["compile", QUICKSTART, *tiny_overrides, "trainer.batch_size=6", "--topology",
                            "v5e:2x2", "--mesh", "data=4"]), "trainer.batch_size")  # fmt: skip


def test_without_libtpu_the_install_command_is_one_line(tiny_overrides, capsys, monkeypatch):
    monkeypatch.setattr("ddiff.runner.compile.topology.libtpu_installed", lambda: False)
    _one_line(capsys, main(["compile", QUICKSTART, *tiny_overrides, "--topology", "v5e:2x2"]),
              "pip install -e '.[tpu]'")  # fmt: skip


HLO = """HloModule jit_step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%body (p: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %p = (s32[], f32[8,4]{1,0}) parameter(0)
  %x = f32[8,4]{1,0} get-tuple-element(%p), index=1
  %g = bf16[16,4]{1,0:T(8,128)} all-gather(%x), dimensions={0}, replica_groups={{0,1}}
  %r = f32[8,4]{1,0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], f32[8,4]{1,0}) tuple(%i, %r)
}

%cond (p: (s32[], f32[8,4])) -> pred[] {
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,4], /*index=1*/y: f32[2]) -> (f32[8,4], f32[2]) {
  %x = f32[8,4]{1,0} parameter(0)
  %w = (s32[], f32[8,4]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %s = (f32[2]{0}, f32[2]{0}) all-reduce-start(%y, %y), replica_groups={{0,1}}, to_apply=%add
  %d = (f32[2]{0}, f32[2]{0}) all-reduce-done(%s)
  ROOT %o = (f32[8,4], f32[2]) tuple(%x, %y)
}
"""


def test_collectives_count_loop_bodies_once_per_iteration():
    """A gather and a reduce in a loop of 12 iterations, one asynchronous reduce outside:
    exact counts and bytes (bf16 16 x 4 = 128 bytes, f32 8 x 4 = 128, 2 x f32 2 = 16)."""
    found = {collective.kind: collective for collective in collectives(HLO)}
    assert set(found) == {"all-gather", "all-reduce"}
    assert found["all-gather"].count == 12 and found["all-gather"].bytes == 12 * 128
    assert found["all-reduce"].count == 13 and found["all-reduce"].bytes == 12 * 128 + 16
    assert shape_bytes("(s32[], f32[3,5]{1,0}, pred[7])") == 4 + 60 + 7


@needs_libtpu
def test_tensor_parallel_splash_attention_compiles_for_tpu():
    """MD4's transformer with the splash kernel under tensor parallelism (data x model =
    1 x 2 on v5e:2x2): the compiler cannot partition a Pallas kernel, so each device runs
    it on its own heads inside a shard_map over model; the program compiles, holds the
    kernel, and all-reduces the row-parallel products over model."""
    recipe = ddiff.runner.load_recipe("recipes/md4_openwebtext.yaml", [
        "network.dim=64", "network.depth=1", "network.heads=2", "network.attention=splash", "data.length=128",
        "trainer.batch_size=2", "eval.batch_size=2", "precision.compute=bfloat16", "mesh.data=1", "mesh.model=2",
    ])  # fmt: skip
    from ddiff.runner.compile import AheadOfTime
    from ddiff.runner.compile.topology import load_topology
    from ddiff.runner.trainer.ahead import abstract_train_args
    from ddiff.runner.trainer.engine import Engine

    engine = Engine(recipe, mesh=make_mesh(recipe.mesh, list(load_topology("v5e:2x2").devices)))
    program = AheadOfTime(
        engine.train_step, abstract_train_args(recipe, engine.optimizer, engine.mesh), mesh=engine.mesh
    )
    text = program.compiled.as_text()
    assert "tpu_custom_call" in text
    assert any(c.kind == "all-reduce" for c in collectives(text))


def test_a_run_compiled_ahead_trains_as_the_jitted_run(full_run, tiny_recipe, tmp_path):
    """``compile_ahead`` (the default on accelerators): the train step compiled from the
    abstract state before anything is allocated and run as that executable gives the
    jitted run's parameters after the tiny recipe's 6 steps, bit for bit."""
    _, expected = full_run
    trainer = ddiff.runner.Trainer(tiny_recipe, tmp_path / "ahead", show_progress=False, compile_ahead=True)
    state = trainer.run()
    assert int(state.step) == int(expected.step)
    for got, want in zip(jax.tree.leaves(state.model), jax.tree.leaves(expected.model), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_run_whose_compiled_step_does_not_fit_is_one_line_before_anything_is_written(
    tiny_overrides, tmp_path, monkeypatch, capsys
):
    """Device memory between the shapes' lower bound and XLA's analysis of the step: the
    lower bound lets it through, the ahead-of-time compile refuses it, before the run
    directory exists."""
    from ddiff.runner.memory import training_estimates
    from ddiff.runner.model import model_shapes
    from ddiff.runner.trainer import engine as engine_module
    from ddiff.runner.trainer.ahead import AheadOfTime, abstract_train_args

    recipe = ddiff.runner.load_recipe(QUICKSTART, tiny_overrides)
    engine = engine_module.Engine(recipe, compile_ahead=True)
    lower = sum(estimate.count for estimate in training_estimates(recipe, model_shapes(recipe)))
    args = abstract_train_args(recipe, engine.optimizer, engine.mesh)
    memory = AheadOfTime(engine.train_step, args, mesh=engine.mesh, donate=(0,)).compiled.memory_analysis()
    needed = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    needed += memory.temp_size_in_bytes
    assert lower < needed
    monkeypatch.setattr(engine_module, "mesh_bytes", lambda devices: (lower + needed) // 2)
    trainer = ddiff.runner.Trainer(recipe, tmp_path / "run", show_progress=False, compile_ahead=True)
    with pytest.raises(ddiff.RecipeError, match="the train step needs .* per device .*lower trainer.batch_size"):
        trainer.run()
    assert not (tmp_path / "run").exists()
