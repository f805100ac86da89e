"""Training under shard_map on named meshes: 8 simulated CPU devices (conftest), and two
processes joined through jax.distributed; tensor parallelism over the mesh's model axis."""

import os
import re
import socket
import subprocess
import sys

import equinox as eqx
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ddiff
import ddiff.runner
from ddiff.runner.mesh import MeshConfig, leaf_spec, make_mesh, tree_specs
from ddiff_plugins.networks import MD4Transformer, Transformer

# Different meshes sum gradients in different orders: float32 round-off only. 3 steps of
# AdamW on a 30k-parameter model keep every parameter within this of the 1-device run.
RTOL, ATOL = 2e-4, 2e-5


@pytest.fixture(scope="module")
def mesh_recipe(tiny_overrides):
    overrides = (*tiny_overrides, "network.dim=32", "trainer.batch_size=16", "trainer.steps=3",
                 "trainer.checkpoint_every=1", "trainer.final_eval=false", "trainer.num_samples=0")
    return ddiff.runner.load_recipe("recipes/quickstart.yaml", overrides)


def _train(recipe, workdir, mesh, stop=None):
    trainer = ddiff.runner.Trainer(recipe, workdir, show_progress=False, mesh=mesh)
    return trainer.run(stop_at_step=stop)


@pytest.fixture(scope="module")
def single(mesh_recipe, tmp_path_factory):
    return _train(mesh_recipe, tmp_path_factory.mktemp("one"), make_mesh(MeshConfig(1, 1)))


def _params(state):
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(state.model, eqx.is_inexact_array))]


def _assert_close(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)


def test_eight_devices_exist():
    assert len(jax.devices()) == 8


def test_fsdp_trains_as_one_device_and_resumes_under_another_mesh(mesh_recipe, single, tmp_path):
    """Two steps on a 2 x 4 mesh (data parallel over 2, FSDP over 4, the large parameters
    sharded over all 8 devices), then the third resumed from its checkpoint under pure data
    parallelism over 8 devices: the parameters are those of 3 steps on one device. One
    test, so that the 2 x 4 programs are compiled once."""
    state = _train(mesh_recipe, tmp_path, make_mesh(MeshConfig(2, 4)), stop=2)
    assert int(state.step) == 2
    params = eqx.filter(state.model, eqx.is_inexact_array)
    sharded = [a for a in jax.tree.leaves(params) if len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated]
    assert sharded, "FSDP must shard the large parameters"
    assert (tmp_path / "metrics.jsonl").read_text().strip(), "metrics were logged"
    state = _train(mesh_recipe, tmp_path, make_mesh(MeshConfig(8, 1)))
    assert int(state.step) == 3
    _assert_close(state, single)


def test_mesh_errors_are_recipe_errors(tiny_overrides):
    with pytest.raises(ddiff.RecipeError, match="needs data x fsdp x model = 3 x -1 x 1"):
        make_mesh(MeshConfig(3, -1))
    with pytest.raises(ddiff.RecipeError, match="at most one of mesh.data, mesh.fsdp and mesh.model"):
        MeshConfig(-1, 1, -1)
    assert dict(make_mesh(MeshConfig(-1, 1, 2)).shape) == {"data": 4, "fsdp": 1, "model": 2}
    with pytest.raises(ddiff.RecipeError, match="mesh.data"):
        ddiff.runner.load_recipe("recipes/quickstart.yaml", [*tiny_overrides, "mesh.data=0"])
    recipe = ddiff.runner.load_recipe("recipes/quickstart.yaml", [*tiny_overrides, "mesh.data=-1", "trainer.batch_size=12"])
    with pytest.raises(ddiff.RecipeError, match="trainer.batch_size: 12 is not divisible"):
        ddiff.runner.Engine(recipe)


def test_samples_do_not_depend_on_the_mesh_or_the_batch(tiny_recipe):
    """Sample i is drawn from fold_in(key, i) whatever the mesh and the batch: the first 4
    of 8 samples drawn on a 2x4 mesh (each device drawing one sample, in a batch of 1) are
    the 4 samples drawn on 1 device in one batch of 4. The network's parameters are
    random (not its zero-initialised head), so its predictions depend on the tokens. (The
    1-device program is the one the tiny run compiles for its final samples.)"""
    one = ddiff.runner.Engine(tiny_recipe, mesh=make_mesh(MeshConfig(1, 1)))
    eight = ddiff.runner.Engine(tiny_recipe, mesh=make_mesh(MeshConfig(2, 4)))
    state = one.init_state()
    params, static = eqx.partition(state.ema, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noisy = [leaf + 0.5 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys, strict=True)]
    state = eqx.tree_at(lambda s: s.ema, state, eqx.combine(jax.tree.unflatten(treedef, noisy), static))
    key = jax.random.PRNGKey(3)
    reference = np.asarray(one.sample(state.ema, key=key, num_samples=4).tokens)
    assert len({row.tobytes() for row in reference}) > 1
    sharded = eight.place(state).ema
    np.testing.assert_array_equal(np.asarray(eight.sample(sharded, key=key, num_samples=8).tokens)[:4], reference)
    np.testing.assert_array_equal(np.asarray(eight.sample(sharded, key=key, num_samples=4).tokens), reference)
    tensor_parallel = ddiff.runner.Engine(tiny_recipe, mesh=make_mesh(MeshConfig(2, 2, 2)))
    split = tensor_parallel.place(state).ema
    assert "model" in split.network.blocks.layers.attention.out.weight.sharding.spec
    np.testing.assert_array_equal(np.asarray(tensor_parallel.sample(split, key=key, num_samples=4).tokens), reference)


def test_fsdp_specs_shard_the_largest_divisible_dimension():
    mesh = make_mesh(MeshConfig(2, 4))
    specs = tree_specs({"w": jax.ShapeDtypeStruct((6, 256), np.float32), "b": jax.ShapeDtypeStruct((6,), np.float32)}, mesh)
    assert tuple(specs["w"]) == (None, "fsdp") and tuple(specs["b"]) == ()


def _overrides(recipe):
    """The recipe's resolved values as overrides (to derive a variant of it)."""
    flat = []

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}.", value)
            elif value is not None:
                flat.append(f"{prefix}{key}={value}")

    walk("", recipe.resolved)
    return flat


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one(mesh_recipe, single, tmp_path):
    recipe_file = tmp_path / "recipe.yaml"
    recipe = ddiff.runner.load_recipe("recipes/quickstart.yaml", [*_overrides(mesh_recipe), "mesh.data=-1"])
    recipe_file.write_text(recipe.to_yaml())
    port = _free_port()
    # One device per process, compiled with the suite's other XLA settings (conftest.py).
    flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "ddiff", "run", str(recipe_file), "--workdir", str(tmp_path / "run"),
             "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=400) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert "over 2 devices in 2 processes; global batch 16, 8 per device" in outputs[0][0]
    _, state = ddiff.runner.load_run(tmp_path / "run")
    assert int(state.step) == 3
    _assert_close(state, single)


def _all_gathers(jaxpr, inside_scan=False, found=None):
    """(output shape, inside a scan body) of every all_gather in a jaxpr, recursively."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "all_gather":
            found.append((tuple(eqn.outvars[0].aval.shape), inside_scan))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _all_gathers(inner, inside_scan or eqn.primitive.name == "scan", found)
    return found


def test_fsdp_gathers_stacked_layers_one_at_a_time(mesh_recipe):
    """Under a 2x4 mesh the train step all-gathers each stacked block parameter inside the
    scan over layers (one layer's slice at a time, and again in the backward pass), never
    the whole stack outside it, and the forward scan does not keep the gathered layers for
    the backward pass; parameters outside the stack are gathered whole. Checked on the
    step's jaxpr (depth 2, width 32)."""
    recipe = ddiff.runner.load_recipe("recipes/quickstart.yaml", [*_overrides(mesh_recipe), "network.depth=2"])
    engine = ddiff.runner.Engine(recipe, mesh=make_mesh(MeshConfig(2, 4)))
    state = engine.init_state()
    tokens = jax.numpy.zeros((16, 8), jax.numpy.int32)
    jaxpr, _, _ = eqx.filter_make_jaxpr(engine.train_step)(state, tokens, None)
    gathers = _all_gathers(jaxpr.jaxpr)
    blocks = state.model.network.blocks.layers
    stacked = {tuple(a.shape) for a in jax.tree.leaves(eqx.filter(blocks, eqx.is_inexact_array))}
    sharded_layers = {
        shape[1:] for shape in stacked if tuple(leaf_spec(shape, 4)) != ()
    }
    assert sharded_layers, "the test model must have sharded block parameters"
    inside = {shape for shape, in_scan in gathers if in_scan}
    outside = {shape for shape, in_scan in gathers if not in_scan}
    assert sharded_layers <= inside, (sharded_layers, inside)
    assert not (stacked & outside), f"whole stacks gathered outside the scan: {stacked & outside}"
    per_layer = [shape for shape, in_scan in gathers if in_scan and shape in sharded_layers]
    assert len(per_layer) >= 2 * len(sharded_layers), "forward and backward each gather every layer"
    kept = _scan_outputs(jaxpr.jaxpr)
    full_stacks = {(2, *shape) for shape in sharded_layers}
    assert not (kept & full_stacks), f"the forward pass keeps gathered layers for the backward: {kept & full_stacks}"


def _scan_outputs(jaxpr, found=None):
    """Shapes of every scan's outputs in a jaxpr (what a forward scan keeps for the backward)."""
    found = set() if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            found |= {tuple(v.aval.shape) for v in eqn.outvars}
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    _scan_outputs(inner, found)
    return found


# --------------------------------------------------------------------------- tensor parallelism


def _replica_groups(text):
    """The device groups of an HLO collective's ``replica_groups``, written out
    ({{0,1},{2,3}}) or as an iota ([4,2]<=[8], [2,4]<=[2,2,2]T(1,0,2))."""
    listed = re.match(r"\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", text)
    if listed:
        return {frozenset(int(i) for i in group.split(",") if i) for group in re.findall(r"\{([\d,]*)\}", listed.group(1))}
    iota = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", text)
    shape, dims = [int(i) for i in iota.group(1).split(",")], [int(i) for i in iota.group(2).split(",")]
    ids = np.arange(np.prod(dims)).reshape(dims)
    if iota.group(3):
        ids = ids.transpose([int(i) for i in iota.group(3).split(",")])
    return {frozenset(row.tolist()) for row in ids.reshape(shape)}


def _collectives(hlo, kind):
    """(device groups, in the backward pass) of every ``kind`` collective on arrays of
    floats in an HLO module's text."""
    found = []
    for line in hlo.splitlines():
        match = re.search(rf"= \(?f32\[.* {kind}\(.*replica_groups=(\S+)", line)
        if match:
            found.append((_replica_groups(match.group(1)), "transpose(" in line))
    return found


def test_tensor_parallel_trains_as_one_device(mesh_recipe, single):
    """Three steps on a 2 x 2 x 2 mesh (data x fsdp x model: heads and hidden width split
    over model, the large parameters also sharded over fsdp) give the losses and gradient
    norms of one device at every step and its parameters after three steps of AdamW;
    evaluation agrees too. The compiled step all-reduces over the model groups (devices
    2i, 2i+1) once per attention and once per MLP in the forward pass, and in the
    backward pass, and never all-gathers a split weight over model in the forward pass
    (each device gathers only its own slice over fsdp)."""
    one = ddiff.runner.Engine(mesh_recipe, mesh=make_mesh(MeshConfig(1, 1)))
    split = ddiff.runner.Engine(mesh_recipe, mesh=make_mesh(MeshConfig(2, 2, 2)))
    reference, state = one.init_state(), split.init_state()
    layers = state.model.network.blocks.layers
    assert layers.mlp_in.weight.sharding.spec == P(None, "model", "fsdp")
    keys = jax.random.split(jax.random.PRNGKey(5), 3)
    batches = [jax.random.randint(k, (16, 8), 0, mesh_recipe.data.vocab_size) for k in keys]
    tokens, _ = split.device_batch({"tokens": np.asarray(batches[0])})
    hlo = split.train_step.lower(state, tokens, None).compile().compiled.as_text()
    for batch in batches:
        reference, expected, _ = one.train_step(reference, batch, None)
        state, metrics, _ = split.train_step(state, split.device_batch({"tokens": np.asarray(batch)})[0], None)
        for name in ("loss", "grad_norm"):
            np.testing.assert_allclose(float(metrics[name]), float(expected[name]), rtol=RTOL)
    _assert_close(state, reference)
    assert "model" in state.model.network.blocks.layers.mlp_out.weight.sharding.spec
    evaluated = split.evaluate(split.place(reference).ema, max_batches=1)
    np.testing.assert_allclose(evaluated["bits_per_token"], one.evaluate(reference.ema, max_batches=1)["bits_per_token"], rtol=RTOL)
    model_groups = {frozenset(ids.tolist()) for ids in np.arange(8).reshape(4, 2)}
    reduces = [backward for groups, backward in _collectives(hlo, "all-reduce") if groups == model_groups]
    assert reduces.count(False) >= 2 and reduces.count(True) >= 1, reduces
    gathers = [backward for groups, backward in _collectives(hlo, "all-gather") if groups == model_groups]
    assert False not in gathers, "a split weight is gathered over model in the forward pass"


def _shapes(tree):
    return eqx.filter(tree, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct))


def test_tensor_parallel_splits_heads_and_hidden_width_in_the_megatron_layout():
    """The specs of each block on a 2 x 2 x 2 mesh: q, k, v, w1, w3 split along their output
    features, wo and w2 along their input features, over model, each also sharded over fsdp
    on its other dimension; the fused q/k/v projection of ``transformer`` (no contiguous
    split of its rows) and the modulation stay whole over model."""
    mesh = make_mesh(MeshConfig(2, 2, 2))
    key = jax.random.PRNGKey(0)
    md4 = eqx.filter_eval_shape(
        lambda k: MD4Transformer(num_states=6, num_outputs=5, seq_len=8, key=k, dim=32, depth=2, heads=2, cond_dim=16), key
    )
    block = tree_specs(_shapes(md4), mesh).blocks.layers
    for name in ("wq", "wk", "wv", "w1", "w3"):
        assert getattr(block, name).weight == P(None, "model", "fsdp"), name
    for name in ("wo", "w2"):
        assert getattr(block, name).weight == P(None, "fsdp", "model"), name
    assert "model" not in tuple(block.modulation.weight)
    dit = eqx.filter_eval_shape(lambda k: Transformer(num_states=6, num_outputs=5, seq_len=8, key=k, dim=32, depth=2, heads=2), key)
    block = tree_specs(_shapes(dit), mesh).blocks.layers
    assert block.attention.out.weight == P(None, "fsdp", "model") and block.attention.out.bias == P()
    assert block.mlp_in.weight == P(None, "model", "fsdp") and block.mlp_in.bias == P(None, "model")
    assert block.mlp_out.weight == P(None, "fsdp", "model")
    assert "model" not in tuple(block.attention.qkv.weight)
    whole = tree_specs(_shapes(md4), make_mesh(MeshConfig(2, 4))).blocks.layers
    assert whole.wq.weight == P(None, "fsdp", None), "without a model axis the fsdp rule alone"


def test_heads_that_do_not_split_over_the_model_axis_are_one_line(tiny_overrides):
    recipe = ddiff.runner.load_recipe("recipes/quickstart.yaml", [*tiny_overrides, "mesh.model=4"])
    engine = ddiff.runner.Engine(recipe)
    with pytest.raises(ddiff.RecipeError, match=r"^network\.heads: 2 attention heads do not split over mesh\.model=4;"):
        engine.check_model()
