"""Peak memory of one FSDP train step: layer-by-layer gathering against gathering every
parameter before the forward pass.

Compiles the train step of the quickstart transformer (widened and deepened) on a mesh
of ``--devices`` simulated CPU devices (all on the fsdp axis) and prints XLA's memory
analysis of the compiled step per device: the arguments (the sharded state) and the
temporaries (activations and gathered parameters). Run:

    python benchmarks/fsdp_memory.py --dim 512 --depth 8
"""

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

    import jax
    import jax.numpy as jnp

    import ddiff
    import ddiff.runner
    import ddiff.runner.trainer.step as train
    from ddiff._sharding import gather
    from ddiff.runner.mesh import MeshConfig, make_mesh
    from ddiff.runner.trainer import compiled as shared

    overrides = [
        f"network.dim={args.dim}", f"network.depth={args.depth}", "network.heads=8",
        f"trainer.batch_size={args.batch}", f"data.length={args.seq}", f"mesh.fsdp={args.devices}",
        "mesh.data=1", "eval.batch_size=64", "trainer.num_samples=8",
    ]
    recipe = ddiff.runner.load_recipe("recipes/quickstart.yaml", overrides)
    mesh = make_mesh(MeshConfig(data=1, fsdp=args.devices))
    tokens = jnp.zeros((args.batch, args.seq), jnp.int32)
    layer_by_layer = train.gather_for_forward
    results = {}
    for name, gathering in [("layer by layer", layer_by_layer), ("all at once", gather)]:
        train.gather_for_forward = gathering
        shared._CACHE.clear()
        engine = ddiff.runner.Engine(recipe, mesh=mesh)
        state = engine.init_state()
        compiled = engine.train_step.lower(state, tokens, None).compile()
        memory = compiled.compiled.memory_analysis()
        results[name] = memory
        params = sum(a.size for a in jax.tree.leaves(ddiff.trainable(state.model)))
        print(
            f"{name:>15}: arguments {memory.argument_size_in_bytes / 2**20:8.1f} MiB, "
            f"temporaries {memory.temp_size_in_bytes / 2**20:8.1f} MiB per device "
            f"({params / 1e6:.1f}M parameters, {4 * params / 2**20:.1f} MiB in float32)"
        )
    train.gather_for_forward = layer_by_layer
    saved = results["all at once"].temp_size_in_bytes - results["layer by layer"].temp_size_in_bytes
    print(f"layer-by-layer gathering saves {saved / 2**20:.1f} MiB of temporaries per device")


if __name__ == "__main__":
    main()
