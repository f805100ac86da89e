"""The command line never surprises: every rejected input is one line without a
traceback (property-based over options, types, ranges and special floats), overrides
stand before or after options, whole sections swap from the command line, components
describe themselves, every option shows its default, and a broken third-party plugin is
named while the others work. Nothing here compiles a program."""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddiff
import ddiff._registry
import ddiff.runner
from ddiff.runner import main
from ddiff.runner.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = "recipes/quickstart.yaml"


def _refused(capsys, status, expected=""):
    captured = capsys.readouterr()
    assert status == 2, captured
    assert captured.err.startswith("ddiff: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and expected in captured.err, captured.err
    return captured.err


# --------------------------------------------------------------------------- found cases


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["eval", "DIR", "--max-examples", "-1"], "argument --max-examples: must be >= 1, got -1"),
        (["eval", "DIR", "--time-draws", "0"], "argument --time-draws: must be >= 1 and <= 1000000, got 0"),
        (["eval", "DIR", "--time-draws", str(2**40)], "argument --time-draws: must be >= 1 and <= 1000000, got 1099"),
        (["sample", "DIR", "--guidance", "nan"], "argument --guidance: must be a finite number, got 'nan'"),
        (["sample", "DIR", "--guidance=-inf"], "must be a finite number, got '-inf'"),
        (["sample", "DIR", "--guidance", "inf"], "must be a finite number, got 'inf'"),
        (["sample", "DIR", "--num", "0"], "argument --num: must be >= 1"),
        (["sample", "DIR", "--num", "2147483648"], "and <= 2147483647"),
        (["sample", "DIR", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["sample", "DIR", "--seed", "-1"], "argument --seed: must be >= 0"),
        (["sample", "DIR", "--steps", "2.5"], "argument --steps: expected an integer, got '2.5'"),
        (["run", QUICKSTART, "--stop-at-step", "-3"], "argument --stop-at-step: must be >= 0, got -3"),
        (["run", QUICKSTART, "--workdri", "x"], "unrecognized arguments: --workdri x; did you mean --workdir?"),
        (["sample", "DIR", "sampler.steps=3"], "ddiff sample: unrecognized arguments: sampler.steps=3"),
        (["diagnose", QUICKSTART, "--objective", "md4_elbo", "--batches", "0"], "must be >= 1"),
        (["plugins", "samplr"], "unknown slot 'samplr'; did you mean 'sampler'?"),
        (["plugins", "sampler", "ancestrl"], "unknown sampler 'ancestrl'; did you mean 'ancestral'?"),
        ([], "the following arguments are required: COMMAND"),
        (["nonsense"], "invalid choice: 'nonsense'"),
    ],
)
def test_rejected_arguments_are_one_line(arguments, expected, capsys):
    _refused(capsys, main(arguments), expected)


def test_found_files_and_folders(tmp_path, capsys):
    """A recipe that is not UTF-8, a recipe that is a folder, a text_file path that is a
    folder, `ddiff plot --output` into a missing folder."""
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes("seed: 0  # caf\xe9\n".encode("latin-1"))
    _refused(capsys, main(["recipe", "show", str(binary)]), "not UTF-8 text (byte 14 cannot be decoded)")
    _refused(capsys, main(["run", str(tmp_path)]), f"{tmp_path}: is a directory; give a recipe YAML file")
    swap = f"data={{kind: text_file, path: {tmp_path}}}"
    _refused(capsys, main(["recipe", "show", QUICKSTART, swap]), f"text_file: {tmp_path} is a directory")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
    missing = tmp_path / "missing" / "curves.png"
    _refused(capsys, main(["plot", str(tmp_path), "--output", str(missing)]), f"folder {missing.parent} does not exist")


# --------------------------------------------------------------------------- property-based

_NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "+inf", "1e400", "-0.0", "0x10", "1_000", "", " ", "٣"]),
    st.text(max_size=8),
)
_OPTIONS = {
    "run": ["--stop-at-step", "--num-processes", "--process-id", "--workdir"],
    "eval": ["--time-draws", "--max-examples", "--output"],
    "sample": ["--num", "--batch-size", "--steps", "--seed", "--label", "--guidance", "--name", "--prefix"],
    "diagnose": ["--batches", "--batch-size", "--repeats", "--seed", "--output"],
    "plot": ["--output"],
}


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(sorted(_OPTIONS)),
    data=st.data(),
    value=_NUMBERS,
    spelled=st.booleans(),
)
def test_every_rejected_input_is_one_line(command, data, value, spelled, tmp_path_factory, capsys):
    """Any value for any option of a command whose target does not exist: the command is
    refused (by the parser, or for the missing target) in one line, nothing is loaded or
    compiled, nothing is written."""
    option = data.draw(st.sampled_from(_OPTIONS[command]))
    text = repr(value) if isinstance(value, float) else str(value)
    missing = str(tmp_path_factory.getbasetemp() / "no-such-target")
    target = [missing + ".yaml"] if command == "run" else [missing]
    extra = ["--objective", "md4_elbo"] if command == "diagnose" else []
    arguments = [command, *target, *extra, *([f"{option}={text}"] if spelled else [option, text])]
    status = main(arguments)
    captured = capsys.readouterr()
    assert status == 2, (arguments, captured)
    assert captured.err.startswith("ddiff: error: ") and captured.err.count("\n") == 1, (arguments, captured.err)
    assert "Traceback" not in captured.err and not Path(missing).exists()


# --------------------------------------------------------------------------- overrides and swaps


def test_overrides_before_or_after_options(tmp_path, capsys):
    """An override after --workdir reaches the recipe (its bad value is named), as does
    one before; both orders give the same recipe."""
    workdir = str(tmp_path / "w")
    for arguments in (
        ["run", QUICKSTART, "--workdir", workdir, "trainer.steps=abc"],
        ["run", QUICKSTART, "trainer.steps=abc", "--workdir", workdir],
        ["run", "--workdir", workdir, QUICKSTART, "trainer.log_every=3", "--stop-at-step", "1", "trainer.steps=abc"],
    ):
        _refused(capsys, main(arguments), "trainer.steps: expected int, got str 'abc'")
    assert not Path(workdir).exists()
    shown = []
    for arguments in (
        ["recipe", "show", QUICKSTART, "trainer.steps=7", "seed=3"],
        ["--no-typecheck", "recipe", "show", QUICKSTART, "trainer.steps=7", "seed=3"],
    ):
        assert main(arguments) == 0
        shown.append(capsys.readouterr().out)
    ddiff.set_typecheck(True)
    assert shown[0] == shown[1] and "steps: 7" in shown[0]
    _refused(capsys, main(["diagnose", QUICKSTART, "--objective", "md4_elbo", "network.dim=x"]), "network.dim: expected int")


def _resolved(*overrides):
    return ddiff.runner.load_recipe(QUICKSTART, overrides).resolved


def test_a_kind_override_keeps_only_what_the_new_kind_accepts():
    """Another kind keeps the section's keys that it accepts and drops the old kind's
    others (which would otherwise stay behind and be refused); keys the command line sets
    in the section stay, in either order."""
    objective = "objective={kind: md4_discrete_elbo, steps: 100}"
    assert _resolved(objective, "objective.kind=md4_elbo")["objective"] == _resolved()["objective"]
    assert _resolved("objective.kind=md4_discrete_elbo", "objective.steps=7")["objective"]["steps"] == 7
    assert _resolved("objective.steps=7", "objective.kind=md4_discrete_elbo")["objective"]["steps"] == 7
    with pytest.raises(ddiff.RecipeError, match="objective.steps: unknown key for objective 'md4_elbo'"):
        _resolved("objective.steps=7", "objective.kind=md4_elbo")
    expected = {"kind": "top_p", "steps": 64, "grid": "uniform", "top_p": 0.9}
    assert _resolved("sampler.kind=top_p", "sampler.top_p=0.9")["sampler"] == expected
    assert _resolved("sampler.top_p=0.9", "sampler.kind=top_p")["sampler"] == expected
    assert _resolved("sampler.kind=d3pm_ancestral")["sampler"] == {"kind": "d3pm_ancestral", "steps": 64, "transforms": []}
    uniform = _resolved("process.kind=uniform", "parameterization.kind=x0", "objective.kind=campbell_elbo",
                        "sampler.kind=tau_leaping")  # fmt: skip
    assert uniform["process"]["schedule"]["kind"] == "cosine", "uniform takes a schedule too: it stays"
    swapped = _resolved("process.schedule.kind=poly", "process.schedule.power=3")["process"]["schedule"]
    assert swapped["kind"] == "poly" and swapped["power"] == 3
    assert _resolved("parameterization=mean", "parameterization.kind=mean")["parameterization"] == {"kind": "mean"}
    assert _resolved("process.schedule=linear", "process.schedule.eps=0.001")["process"]["schedule"]["eps"] == 0.001


def _documented_swaps() -> list[str]:
    """The `ddiff recipe show` lines of docs/running.md's section on swapping components."""
    text = (ROOT / "docs" / "running.md").read_text()
    section = text[text.index("## Swapping a component") :]
    section = section[: section.index("\n## ", 1)]
    return [line.strip() for line in section.splitlines() if line.strip().startswith("ddiff recipe show")]


def test_documented_section_swaps_load(capsys):
    """Every swap example in docs/running.md (schedule, parameterization, objective,
    sampler, network) loads, and each swapped section has the kind it names."""
    from ddiff.runner.recipe import parse_yaml

    covered = set()
    for line in _documented_swaps():
        arguments = shlex.split(line)[1:]
        assert main(arguments) == 0, (line, capsys.readouterr().err)
        resolved = parse_yaml(capsys.readouterr().out, "shown")
        for override in arguments[3:]:
            path, _, text = override.partition("=")
            value = parse_yaml(text, "override")
            kind = value["kind"] if isinstance(value, dict) else value
            section = resolved
            for part in path.split("."):
                section = section[part]
            assert section["kind"] == kind, (line, path, section)
            covered.add(path.split(".")[-1])
    assert {"schedule", "parameterization", "objective", "sampler", "network"} <= covered, covered


# --------------------------------------------------------------------------- introspection


def test_plugins_describes_a_component(capsys):
    assert main(["plugins", "sampler", "top_p"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sampler top_p: ddiff_plugins.md4.TopPSampler  [plugin: md4]")
    assert "nucleus" in out  # the docstring
    assert "recipe keys:\n  steps  int = 128\n  grid   'uniform' | 'cosine' = 'uniform'\n  top_p  float = 0.98\n" in out
    assert "requires: parameterization: mean; process: masked, scalar_schedule" in out
    assert main(["plugins", "network", "transformer"]) == 0
    out = capsys.readouterr().out
    assert "set by ddiff: num_states, num_outputs, seq_len, num_classes, key" in out
    assert "provides: worked out from its settings" in out
    assert main(["plugins", "process", "masked"]) == 0
    assert "  schedule  schedule section = required" in capsys.readouterr().out
    assert main(["plugins", "schedule"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("schedule:\n") and "cosine" in out and "sampler:" not in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ddiff {ddiff.__version__}"


def _actions(parser: argparse.ArgumentParser, prefix: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _actions(child, f"{prefix} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield prefix, parser, action


def test_every_option_has_help_that_shows_its_default():
    missing = []
    for command, parser, action in _actions(build_parser(), "ddiff"):
        shown = parser._get_formatter()._expand_help(action) if action.help else ""
        if not shown or (action.option_strings and "default" not in shown):
            missing.append(f"{command} {action.option_strings or action.dest}")
    assert not missing, missing


# --------------------------------------------------------------------------- broken plugins


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """A third-party package on the path whose ``ddiff`` entry point's module raises
    ImportError, as a plugin needing a missing dependency would."""
    info = tmp_path / "broken_ddiff_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-ddiff-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[ddiff]\nbroken = broken_ddiff_plugin\n")
    (tmp_path / "broken_ddiff_plugin.py").write_text("raise ImportError('needs torch, which is not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ddiff._registry, "_default", None)
    return "broken = broken_ddiff_plugin"


def test_a_broken_plugin_is_named_and_the_others_work(broken_plugin, capsys):
    registry = ddiff.build_registry(ddiff.make_plugin_manager())
    (broken,) = registry.broken
    assert (broken.name, broken.entry_point) == ("broken", broken_plugin)
    assert broken.error == "ImportError: needs torch, which is not installed"
    assert "md4_elbo" in registry.names("objective")

    assert main(["recipe", "show", QUICKSTART]) == 0
    captured = capsys.readouterr()
    assert "kind: md4_elbo" in captured.out
    assert captured.err == (
        "ddiff: warning: plugin 'broken' (entry point broken = broken_ddiff_plugin) failed to import: "
        "ImportError: needs torch, which is not installed; its components are unavailable\n"
    )
    assert main(["plugins"]) == 0
    captured = capsys.readouterr()
    assert "broken plugins (their components are unavailable):\n  broken " in captured.out
    assert "entry point broken = broken_ddiff_plugin: ImportError: needs torch" in captured.out
    assert captured.err == ""
    assert main(["recipe", "show", QUICKSTART, "sampler=torch_sampler"]) == 2
    warning, error = capsys.readouterr().err.splitlines()
    assert warning.startswith("ddiff: warning: plugin 'broken'") and error.startswith("ddiff: error: ")
    assert "unknown sampler 'torch_sampler' (available: analytic, ancestral, " in error
    assert error.endswith("); plugins that failed to import, which may provide it: 'broken'")


def test_console_script_without_arguments():
    result = subprocess.run([sys.executable, "-m", "ddiff"], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "ddiff: error: ddiff: the following arguments are required: COMMAND (see ddiff --help)\n"
