"""Ctrl-C and SIGTERM at any moment of a command, sizes and names that cannot be written:
each one line, nothing half-written left behind."""

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES

import ddiff
from ddiff.runner.cli import main
from ddiff.runner.commands import run as run_command
from ddiff.runner.files import reserved_path
from ddiff.runner.trainer import sampling
from ddiff_plugins import datasets

TINY_RUN = ["recipes/quickstart.yaml", *TINY_OVERRIDES]


def _leftovers(directory):
    return sorted(
        path.name
        for path in directory.iterdir()
        if ".tmp" in path.name or path.name.endswith(".reserved")
    )


def test_ctrl_c_during_start_up_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(run_command, "load_recipe", interrupted)
    assert main(["run", *TINY_RUN, "--workdir", str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.splitlines() == ["ddiff: interrupted by SIGINT"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_command_is_still_importing_is_one_line(signum):
    """The signal arrives once the command's process has begun loading JAX (its shared
    library is mapped), seconds before ``main`` runs: one line, status 128 + signal, no
    traceback. Should the import be done first, ``main``'s own handlers give the same."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ddiff", "plugins"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        with open(f"/proc/{process.pid}/maps") as maps:
            if "jaxlib" in maps.read():
                break
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signum, err
    assert err.decode().splitlines() == [f"ddiff: interrupted by {signal.Signals(signum).name}"]


def test_a_second_signal_after_a_swallowed_one_ends_the_command_at_once():
    """A first SIGTERM whose exception is swallowed (as in a garbage-collection callback,
    where Python ignores exceptions) lets the command go on; the second ends it at once,
    with one line and 128 + 15, whatever the command is doing."""
    script = (
        "import os, signal\n"
        "from ddiff.runner.trainer.signals import CommandSignals, Interrupted\n"
        "with CommandSignals():\n"
        "    try:\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    except Interrupted:\n"
        "        pass\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    print('went on')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 143 and result.stdout == ""
    assert result.stderr.splitlines() == ["ddiff: interrupted by SIGTERM"]


def test_a_swallowed_ctrl_c_still_stops_the_run_at_its_first_step(tmp_path, monkeypatch, capsys):
    """A library that catches the interrupt of an early Ctrl-C cannot make the run go on."""
    load_recipe = run_command.load_recipe

    def swallowed(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            pass
        return load_recipe(*args, **kwargs)

    monkeypatch.setattr(run_command, "load_recipe", swallowed)
    assert main(["run", *TINY_RUN, "--workdir", str(tmp_path / "run")]) == 130
    (line,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ddiff:")]
    assert line.startswith("ddiff: stopped by SIGINT at step 0; checkpoint saved")


def test_sigterm_during_sample_removes_its_temporary_files(full_run, tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(full_run[0], workdir)
    before = sorted(path.name for path in (workdir / "samples").iterdir())
    add = sampling.SampleWriter.add

    def terminated(self, *args, **kwargs):
        add(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sampling.SampleWriter, "add", terminated)
    assert main(["sample", str(workdir), "--num", "4", "--batch-size", "2"]) == 143
    assert capsys.readouterr().err.splitlines() == ["ddiff: interrupted by SIGTERM"]
    assert sorted(path.name for path in (workdir / "samples").iterdir()) == before
    assert _leftovers(workdir / "samples") == []


def test_sample_num_beyond_the_disk_is_one_line_before_any_file(
    full_run, tmp_path, monkeypatch, capsys
):
    workdir = tmp_path / "run"
    shutil.copytree(full_run[0], workdir)
    before = sorted(path.name for path in (workdir / "samples").iterdir())
    monkeypatch.setattr(
        sampling.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**31, 2**30, 2**30)
    )
    assert main(["sample", str(workdir), "--num", "2147483647"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        "ddiff: error: 2147483647 samples of 8 tokens need 64.0 GiB for sample_step"
    )
    assert line.endswith("has 1.0 GiB free; draw fewer samples (--num) or free disk space")
    assert sorted(path.name for path in (workdir / "samples").iterdir()) == before


def test_quality_and_diagnose_pass_over_a_name_another_command_holds(full_run, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(full_run[0], workdir)
    with reserved_path(workdir / "quality", (".json", ".png")) as held:
        assert (
            main(["quality", str(workdir), "--sampler", "ancestral", "--steps", "2", "--num", "4"])
            == 0
        )
        assert not Path(f"{held}.json").exists()
    assert (workdir / "quality-2.json").exists() and (workdir / "quality-2.png").exists()
    with reserved_path(workdir / "diagnose.json") as held:
        assert main(["diagnose", str(workdir), "--objective", "md4_elbo", "--batches", "1"]) == 0
        assert not held.exists()
    assert (workdir / "diagnose-2.json").exists()
    assert _leftovers(workdir) == []


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "{run}", "--name", "s" * 250],
        [
            "diagnose",
            "{run}",
            "--objective",
            "md4_elbo",
            "--output",
            "{run}/" + "d" * 250 + ".json",
        ],
        ["eval", "{run}", "--output", "e" * 300 + ".json"],
    ],
    ids=["sample", "diagnose", "eval"],
)
def test_a_name_too_long_for_the_file_system_is_one_line(full_run, command, capsys):
    before = sorted(path.name for path in full_run[0].rglob("*"))
    assert main([part.replace("{run}", str(full_run[0])) for part in command]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert (
        line.startswith("ddiff: error: ")
        and "too long" in line
        and line.endswith("choose a shorter name")
    )
    assert sorted(path.name for path in full_run[0].rglob("*")) == before


def test_a_zlib_corrupt_cifar10_tarball_is_one_data_error(tmp_path):
    """A deflate stream damaged inside a member's data (the tar headers intact)."""
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("data_batch_1", "data_batch_2"):
            content = rng.integers(0, 16, 40000, dtype=np.uint8).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    data = bytearray(buffer.getvalue())
    start = len(data) // 5
    data[start : start + 64] = bytes((i * 37 + 20) % 256 for i in range(64))
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(bytes(data))
    source = datasets.CIFAR10Source(root=str(tmp_path), download=False)
    with pytest.raises(
        ddiff.DataError,
        match=r"is corrupt \(zlib: .*\), a damaged download; delete it and download it again",
    ):
        source.split("train")
