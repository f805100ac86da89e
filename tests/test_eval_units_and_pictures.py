"""Evaluation units, image grids and the curves plot."""

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

import ddiff
import ddiff.runner
from ddiff import METRICS
from ddiff.runner import image_grid, metric_report, plot_run, png_bytes
from ddiff.runner.plot import eval_unit


def test_metric_report_units():
    assert metric_report("bits_per_token", 3.0, 0.1) == {}
    assert metric_report("bits_per_dim", 3.0, 0.1) == {"bits_per_dim": 3.0, "bits_per_dim_stderr": 0.1}
    assert metric_report("bits_per_char", 1.5, 0.01)["bits_per_char_stderr"] == 0.01
    report = metric_report("perplexity", math.log2(22.13), 0.002)
    assert report["perplexity"] == pytest.approx(22.13)
    assert report["perplexity_stderr"] == pytest.approx(22.13 * math.log(2.0) * 0.002)
    with pytest.raises(ddiff.DataError, match="unknown evaluation metric 'nats'"):
        metric_report("nats", 1.0, 0.1)


def test_built_in_sources_declare_a_known_metric():
    expected = {
        "markov": "bits_per_token",
        "cifar10": "bits_per_dim",
        "imagenet64": "bits_per_dim",
        "text8": "bits_per_char",
        "openwebtext": "perplexity",
        "zero_shot": "perplexity",
        "token_file": "bits_per_token",
        "text_file": "bits_per_char",
    }
    registry = ddiff.default_registry()
    required = {"token_file": {"path": "x.bin", "vocabulary": 5}, "text_file": {"path": "x.txt"}}
    for kind, metric in expected.items():
        source = registry.get("data", kind)(**required.get(kind, {}))
        assert source.metric == metric and metric in METRICS
        assert (source.image_shape is not None) == (metric == "bits_per_dim")


def test_image_grid_places_each_image_in_hwc_order():
    images = np.arange(5 * 2 * 3 * 3).reshape(5, 2 * 3 * 3) % 256
    grid = image_grid(images, (2, 3, 3), padding=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 3) and grid.dtype == np.uint8
    np.testing.assert_array_equal(grid[1:3, 1:4], images[0].reshape(2, 3, 3))
    np.testing.assert_array_equal(grid[4:6, 5:8], images[4].reshape(2, 3, 3))
    assert not grid[4:6, 9:12].any()  # the unused sixth cell stays black
    assert image_grid(np.full((1, 4), 300), (2, 2, 1)).max() == 255  # a mask id is clipped


def test_png_bytes_round_trip(tmp_path):
    grid = image_grid(np.random.default_rng(0).integers(0, 256, (4, 48)), (4, 4, 3))
    (tmp_path / "grid.png").write_bytes(png_bytes(grid))
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "grid.png")), grid)
    grey = image_grid(np.zeros((1, 16)), (4, 4, 1))
    assert Image.open(io.BytesIO(png_bytes(grey))).mode == "L"


def test_plot_draws_loss_and_eval_in_the_data_unit(tmp_path):
    records = [{"step": s, "split": "train", "loss": 10.0 / s, "bits_per_token": 1.0} for s in range(1, 6)]
    records += [
        {"step": 5, "split": "eval", "bits_per_token": 2.0, "bits_per_char": 2.0, "bits_per_char_stderr": 0.1}
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert eval_unit(records) == "bits_per_char"
    path = plot_run(tmp_path)
    assert path == tmp_path / "curves.png" and Image.open(path).format == "PNG"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
