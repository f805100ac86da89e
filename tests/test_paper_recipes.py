"""The paper's recipes, each run for 2 steps through the command line on small files in
the real on-disk formats, shrunk by overrides; then ``ddiff eval`` and ``ddiff plot``."""

import json
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import write_cifar10, write_imagenet64, write_text8, write_tokens
from PIL import Image

from ddiff.runner import load_recipe, main

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PAPER_RECIPES = ("md4_cifar10", "md4_imagenet64", "md4_text8", "md4_openwebtext")
SHRINK = (
    "trainer.steps=2",
    "trainer.batch_size=2",
    "trainer.log_every=1",
    "trainer.checkpoint_every=2",
    "trainer.num_samples=4",
    "sampler.steps=2",
    "eval.batch_size=4",
    "eval.time_draws=2",
    "mesh.data=1",
)
SMALL_TRANSFORMER = ("network.dim=32", "network.depth=2", "network.heads=4", "network.cond_dim=16")
SMALL_UNET = ("network.channels=8", "network.groups=4", "network.num_blocks=1")


def _run(capsys, name: str, workdir: Path, *overrides: str) -> str:
    code = main(["run", str(RECIPES / f"{name}.yaml"), *SHRINK, *overrides, "--workdir", str(workdir)])
    out, err = capsys.readouterr()
    assert code == 0, err
    print(out)
    return out


def _eval_json(workdir: Path, name: str = "eval.json") -> dict:
    return json.loads((workdir / name).read_text())


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_recipe_opens_with_the_paper_result_and_loads(name):
    text = (RECIPES / f"{name}.yaml").read_text()
    assert text.startswith("# MD4") and "Paper:" in text.split("\n\n")[0]
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.names["objective"] == "md4_elbo"


@pytest.mark.slow
def test_cifar10_recipe(tmp_path, capsys):
    write_cifar10(tmp_path / "data", per_batch=2, test=3)
    workdir = tmp_path / "run"
    out = _run(capsys, "md4_cifar10", workdir, f"data.root={tmp_path / 'data'}", "data.download=false", *SMALL_UNET)
    assert "unet network (" in out and "parameters); data cifar10 (V=256, D=3072)" in out
    assert "bits_per_dim" in out
    result = _eval_json(workdir)
    assert result["num_sequences"] == 3 and result["bits_per_dim"] == result["bits_per_token"]
    assert 7.0 < result["bits_per_dim"] < 9.0 and result["bits_per_dim_stderr"] > 0
    grid = Image.open(workdir / "samples" / "step_00000002.png")
    assert grid.size == (2 * 34 + 2, 2 * 34 + 2) and grid.mode == "RGB"
    assert main(["plot", str(workdir)]) == 0
    assert Image.open(workdir / "curves.png").size[0] > 500


@pytest.mark.slow
def test_imagenet64_recipe(tmp_path, capsys):
    write_imagenet64(tmp_path / "data", files=2, per_file=2, val=2)
    workdir = tmp_path / "run"
    out = _run(
        capsys, "md4_imagenet64", workdir, f"data.root={tmp_path / 'data'}", *SMALL_UNET,
        "network.dropout=0.0", "network.transformer_depth=1", "network.transformer_dim=16",
        "network.transformer_heads=2", "network.patch_size=8", "trainer.num_samples=0",
    )  # fmt: skip
    assert "data imagenet64 (V=256, D=12288)" in out
    assert 7.0 < _eval_json(workdir)["bits_per_dim"] < 9.0


@pytest.mark.slow
def test_text8_recipe_then_eval_on_the_test_split_and_plot(tmp_path, capsys):
    write_text8(tmp_path / "data", characters=4000)
    workdir = tmp_path / "run"
    learn = ("optimizer.warmup_steps=0", "optimizer.learning_rate=0.01", "optimizer.ema_decay=0.0")
    root = f"data.root={tmp_path / 'data'}"
    out = _run(capsys, "md4_text8", workdir, root, "data.length=32", *SMALL_TRANSFORMER, *learn)
    assert "md4_transformer network (" in out and "(V=27, D=32)" in out and "bits_per_char" in out
    validation = _eval_json(workdir)
    assert validation["num_sequences"] == 200 // 32
    assert 3.0 < validation["bits_per_char"] < 7.0
    samples = (workdir / "samples" / "step_00000002.txt").read_text().splitlines()
    assert len(samples) == 4 and all(len(s) == 32 and set(s) <= set("abcdefghijklmnopqrstuvwxyz ") for s in samples)

    code = main(["eval", str(workdir), "data.eval_split=test", "--output", "eval_test.json"])
    assert code == 0, capsys.readouterr().err
    test = _eval_json(workdir, "eval_test.json")
    assert test["step"] == 2 and test["num_sequences"] == 200 // 32
    assert test["bits_per_char"] != validation["bits_per_char"]
    assert _eval_json(workdir) == validation

    assert main(["plot", str(workdir), "--output", str(tmp_path / "curves.png")]) == 0
    assert Image.open(tmp_path / "curves.png").format == "PNG"


@pytest.mark.slow
def test_openwebtext_recipe_reports_perplexity(tmp_path, capsys):
    write_tokens(tmp_path / "data" / "openwebtext_gpt2.bin", 64 * 100, 50257)
    workdir = tmp_path / "run"
    out = _run(
        capsys, "md4_openwebtext", workdir, f"data.root={tmp_path / 'data'}", "data.length=64",
        *SMALL_TRANSFORMER, "trainer.num_samples=1",
    )  # fmt: skip
    assert "(V=50257, D=64)" in out and "perplexity" in out
    result = _eval_json(workdir)
    assert result["num_sequences"] == 2
    assert result["perplexity"] == pytest.approx(2.0 ** result["bits_per_token"])
    assert 1.0 < result["perplexity"] < float("inf")
    assert result["perplexity_stderr"] == pytest.approx(
        result["perplexity"] * np.log(2.0) * result["bits_per_token_stderr"]
    )

    other = tmp_path / "text8"
    write_text8(other, characters=2000)
    code = main(["eval", str(workdir), f"data={{kind: text8, root: {other}, length: 64}}"])
    err = capsys.readouterr().err
    assert code == 2 and "trained on data with V=50257, D=64; the data asked for has V=27, D=64" in err
    assert err.count("\n") == 1


GENMD4_RECIPES = ("genmd4_text8", "genmd4_openwebtext")


@pytest.mark.parametrize("name", GENMD4_RECIPES)
def test_genmd4_recipe_is_its_md4_recipe_with_a_learned_schedule(name):
    """Each GenMD4 recipe opens with the paper's result and equals the MD4 recipe for the
    same data in every setting but the schedule, objective, sampler and the schedule's
    optimizer group (so the 2-step run of md4_openwebtext covers the rest of
    genmd4_openwebtext; only genmd4_text8 is run, to keep the suite's compilations few)."""
    text = (RECIPES / f"{name}.yaml").read_text()
    assert text.startswith("# GenMD4") and "Paper:" in text.split("\n\n")[0]
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.names["objective"] == "genmd4_elbo" and recipe.names["sampler"] == "genmd4_ancestral"
    assert recipe.resolved["process"]["schedule"] == {
        "kind": "learnable_poly", "initial_power": 1.0, "initial_powers": None, "eps": 1e-4
    }  # fmt: skip
    assert recipe.optimizer.schedule.weight_decay == 0.0
    md4 = load_recipe(RECIPES / f"{name.replace('genmd4', 'md4')}.yaml").resolved
    ours = dict(recipe.resolved)
    for section in ("objective", "sampler"):
        assert ours.pop(section)["kind"].startswith("genmd4")
        md4.pop(section)
    assert ours.pop("process")["kind"] == md4.pop("process")["kind"] == "masked"
    assert ours["optimizer"].pop("schedule") is not None and md4["optimizer"].pop("schedule") is None
    assert ours == md4


@pytest.mark.slow
def test_genmd4_text8_recipe_learns_its_powers_with_their_own_learning_rate(tmp_path, capsys):
    """Two steps with the schedule's learning rate raised to 0.1 (no warmup): the logged
    powers move away from 1 while the logged learning rate stays the network's (<= 3e-4).
    No samples or final evaluation (the sampler and the nelbo without training are
    checked by the conformance kit), a 1-block network: the run is mostly compilation."""
    write_text8(tmp_path / "data", characters=4000)
    workdir = tmp_path / "run"
    out = _run(
        capsys, "genmd4_text8", workdir, f"data.root={tmp_path / 'data'}", "data.length=32",
        "network.dim=16", "network.depth=1", "network.heads=2", "network.cond_dim=16",
        "optimizer.warmup_steps=0", "optimizer.schedule.learning_rate=0.1",
        "trainer.num_samples=0", "trainer.final_eval=false",
    )  # fmt: skip
    assert "genmd4_elbo with masked process" in out and "(V=27, D=32)" in out
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["split"] == "train"][-1]
    assert last["step"] == 2 and 0 < last["learning_rate"] <= 3e-4
    assert last["terms/power_min"] < 0.99 or last["terms/power_max"] > 1.01, last
    assert last["terms/power_min"] <= last["terms/power_mean"] <= last["terms/power_max"]
    assert last["loss"] != last["nelbo"] and 3.0 < last["bits_per_token"] < 7.0


def test_plot_and_eval_refuse_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\nnot json\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl, line 2: not JSON" in capsys.readouterr().err
