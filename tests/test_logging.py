"""The `logging` section: metrics.jsonl always, TensorBoard event files (tensorboardX) and
Weights & Biases (offline: nothing reaches the network), with the real writers of the
test extra and, for the calls W&B receives, a fake module that records them."""

import json
import struct
import sys
import types
from pathlib import Path

import pytest

import ddiff
import ddiff.runner
from ddiff.runner.trainer.writers import WANDB_ID_FILE, MetricWriters

QUICKSTART = "recipes/quickstart.yaml"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """W&B offline, without error reports, with its config and cache under tmp_path."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_ERROR_REPORTING": "false",
        "WANDB_SILENT": "true",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(name, value)


def _events(directory: Path) -> list:
    """Every event of the TFRecord event files under ``directory``, in file order: each
    record is a little-endian uint64 length, its CRC, the data and the data's CRC."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event()
            event.ParseFromString(data[offset + 12 : offset + 12 + length])
            events.append(event)
            offset += 12 + length + 4
    return events


def _scalars(events) -> dict[tuple[str, int], float]:
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}


def test_a_run_writes_tensorboard_events_and_an_offline_wandb_run(tiny_overrides, tmp_path, offline):
    recipe = ddiff.runner.load_recipe(
        QUICKSTART,
        (*tiny_overrides, "logging.tensorboard=true", "logging.wandb=true", "logging.wandb_mode=offline",
         "logging.wandb_project=ddiff-tests"),
    )  # fmt: skip
    workdir = tmp_path / "run"
    ddiff.runner.Trainer(recipe, workdir, show_progress=False).run(stop_at_step=2)
    (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    events = _events(workdir / "tensorboard")
    scalars = _scalars(events)
    assert scalars[("train/loss", 2)] == pytest.approx(record["loss"], rel=1e-6)  # float32 in the event file
    assert {tag for tag, _ in scalars} == {f"train/{key}" for key in record if key not in ("step", "split")}
    assert any(v.tag.startswith("recipe") for e in events for v in e.summary.value)
    import wandb

    wandb.teardown()  # waits for W&B's service to write out the run it was handed
    run_id = (workdir / WANDB_ID_FILE).read_text().strip()
    (log,) = (workdir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    contents = log.read_bytes()
    for key, value in record.items():
        if key not in ("step", "split"):
            assert f"train/{key}".encode() in contents and json.dumps(value).encode() in contents, key


def test_a_resumed_run_purges_later_tensorboard_events(tiny_recipe, tmp_path):
    """A run resumed at step 4 after a crash at step 6 (events written for 2, 4 and 6)
    writes with purge_step 4, so TensorBoard drops the first file's step 6, as
    metrics.jsonl drops its line."""
    recipe = ddiff.runner.load_recipe(QUICKSTART, ("logging.tensorboard=true",))
    first = MetricWriters(tmp_path, recipe, 0)
    for step in (2, 4, 6):
        first.write({"step": step, "split": "train", "loss": float(step)})
    first.close()
    resumed = MetricWriters(tmp_path, recipe, 4)
    resumed.write({"step": 6, "split": "train", "loss": 60.0})
    resumed.close()
    purges = [e.step for e in _events(tmp_path / "tensorboard") if e.session_log.status == e.session_log.START]
    assert purges == [4]
    losses = [(e.step, v.simple_value) for e in _events(tmp_path / "tensorboard") for v in e.summary.value if v.tag == "train/loss"]
    assert losses[-1] == (6, 60.0)


class _FakeRun:
    def __init__(self, calls, settings):
        self.calls, self.settings, self.dir, self.url = calls, settings, "", "https://example.invalid/run"

    def log(self, data, step):
        self.calls.append(("log", step, data))

    def finish(self, exit_code=None):
        self.calls.append(("finish", exit_code))


def _fake_wandb(calls):
    module = types.ModuleType("wandb")
    module.Settings = lambda **kwargs: types.SimpleNamespace(mode="online", **kwargs)

    def init(**kwargs):
        calls.append(("init", kwargs))
        return _FakeRun(calls, kwargs["settings"])

    module.init = init
    return module


def test_wandb_receives_the_recipe_the_records_and_the_same_id_on_resume(tiny_recipe, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    recipe = ddiff.runner.load_recipe(QUICKSTART, ("logging.wandb=true", "logging.wandb_mode=offline"))
    records = [
        {"step": 2, "split": "train", "loss": 2.5, "bits_per_token": 1.25},
        {"step": 2, "split": "eval", "bits_per_token": 1.5, "num_tokens": 256},
    ]
    writers = MetricWriters(tmp_path, recipe, 0)
    for record in records:
        writers.write(record)
    assert writers.locations() == [("wandb", "https://example.invalid/run")]
    writers.close()
    MetricWriters(tmp_path, recipe, 2).close(failed=True)
    (_, first), log_train, log_eval, finished, (_, second), failed = calls
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    assert first["id"] == second["id"] == run_id and first["resume"] == "allow"
    assert first["config"] == recipe.resolved and first["dir"] == str(tmp_path)
    assert (first["project"], first["mode"], first["name"]) == ("ddiff", "offline", tmp_path.name)
    assert log_train == ("log", 2, {"train/loss": 2.5, "train/bits_per_token": 1.25})
    assert log_eval == ("log", 2, {"eval/bits_per_token": 1.5, "eval/num_tokens": 256.0})
    assert (finished, failed) == (("finish", 0), ("finish", 1))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == records


def test_a_writer_that_is_not_installed_is_refused_at_load(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    with pytest.raises(ddiff.RecipeError) as refused:
        ddiff.runner.load_recipe(QUICKSTART, ("logging.tensorboard=true",))
    assert str(refused.value) == (
        f"{QUICKSTART}: logging.tensorboard: tensorboard needs the tensorboardX package: "
        "pip install 'ddiff[tensorboard]' (or set logging.tensorboard=false)"
    )
