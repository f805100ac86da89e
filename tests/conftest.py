"""Shared fixtures: a tiny recipe whose compiled functions are reused across tests."""

import os
import tempfile

# Eight simulated CPU devices for the mesh tests (single-device tests use mesh.data=1).
# The tests compile many small programs and run each a few times, so compile time is most
# of the suite's time. XLA:CPU's older loop emitters in place of its MLIR fusion emitters
# compile a third faster (an objective check 1.28 s against 0.79 s; three sampler, recipe
# and block-diffusion files 107 s against 84 s); with them, LLVM optimisation level 0
# (level 1 and 3 are slower to compile, with the same results) and its expensive passes
# off: the conformance and mutation files 115 s against 98 s.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false",
)
# XLA:CPU compiles the partitionable threefry PRNG 10-20x more slowly (seconds per random
# call site); the suite never shards random generation, so it uses the classic lowering.
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "false")
# One compilation per program for the whole run: xdist workers and the subprocesses the
# tests start share JAX's persistent compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "ddiff-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# Runs report MFU against a peak; the suite gives it (100 GFLOP/s) rather than measuring
# the CPU's in every process.
os.environ.setdefault("DDIFF_PEAK_FLOPS", "1e11")

import pytest  # noqa: E402

import ddiff  # noqa: E402
import ddiff.runner  # noqa: E402

TINY_OVERRIDES = (
    "data.num_symbols=5",
    "data.length=8",
    "data.concentration=0.2",
    "data.num_train=256",
    "data.num_eval=32",
    "network.dim=16",
    "network.depth=1",
    "network.heads=2",
    "network.mlp_ratio=2",
    "sampler.steps=4",
    "trainer.steps=6",
    "trainer.batch_size=8",
    "trainer.log_every=2",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=2",
    "trainer.num_samples=4",
    "eval.batch_size=16",
    "eval.time_draws=2",
    "optimizer.warmup_steps=2",
    "mesh.data=1",
    "logging.plot=false",
)


@pytest.fixture(scope="session")
def tiny_overrides() -> tuple[str, ...]:
    return TINY_OVERRIDES


@pytest.fixture(scope="session")
def registry() -> ddiff.Registry:
    return ddiff.default_registry()


@pytest.fixture(scope="session")
def tiny_recipe() -> ddiff.runner.Recipe:
    """The quickstart recipe shrunk to seconds: V=5, D=8, a 1-block width-16 network."""
    return ddiff.runner.load_recipe("recipes/quickstart.yaml", TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_model(tiny_recipe):
    import jax

    return ddiff.runner.build_model(tiny_recipe, jax.random.PRNGKey(0))


@pytest.fixture(scope="session")
def full_run(tmp_path_factory, tiny_recipe):
    """The tiny recipe trained uninterrupted for its 6 steps: (workdir, final state)."""
    workdir = tmp_path_factory.mktemp("full")
    state = ddiff.runner.Trainer(tiny_recipe, workdir, show_progress=False).run()
    return workdir, state
