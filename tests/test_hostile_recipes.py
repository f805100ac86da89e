"""Hostile recipes and command lines: alias bombs, deep nesting, devices and FIFOs as
files, huge integers, unhashable keys, merge keys, a closed pipe and an unknown backend
each end in one ``ddiff: error:`` line (or succeed), never a traceback or a hang."""

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ddiff
from ddiff.runner import main
from ddiff.runner.recipe import MAX_NODES, parse_yaml

QUICKSTART = "recipes/quickstart.yaml"


def _one_line(capsys, status, expected=""):
    captured = capsys.readouterr()
    assert status == 2, captured
    assert captured.err.startswith("ddiff: error: ") and captured.err.count("\n") == 1, captured.err
    assert expected in captured.err, captured.err


def _billion_laughs(levels: int = 10, width: int = 9) -> str:
    lines = ["l0: &l0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


_REFUSED_TEXT = {
    "alias bomb": (_billion_laughs(), "once its aliases are expanded"),
    "alias inside itself": ("a: &a [1, *a]\n", "refers to the list or mapping that holds it"),
    "nested 10,000 deep": ("[" * 10_000 + "]" * 10_000, "nested more than 64 deep"),
    "mapping nested 200 deep": ("".join("  " * i + f"k{i}:\n" for i in range(200)), "nested more than 64 deep"),
    "aliases nested deep": (
        "a: &a " + "[" * 40 + "]" * 40 + "\nb: &b " + "[" * 30 + "*a" + "]" * 30 + "\n",
        "nested more than 64 deep once",
    ),
    "list as key": ("? [1, 2]\n: 3\n", "a list cannot be a key"),
    "mapping as key": ("data: {{a: 1}: 2}\n", "a dict cannot be a key"),
    "5,000 digits": ("seed: " + "7" * 5000 + "\n", "integer of 5000 characters"),
    "65 bits": (f"seed: {2**64}\n", "does not fit in 64 bits"),
    "duplicate after merge": ("a: &a {x: 1}\nb: {<<: *a, y: 2, y: 3}\n", "duplicate key 'y'"),
}


@pytest.mark.parametrize("case", list(_REFUSED_TEXT))
def test_hostile_yaml_is_one_line(case, tmp_path, capsys):
    text, expected = _REFUSED_TEXT[case]
    path = tmp_path / "r.yaml"
    path.write_text(text)
    _one_line(capsys, main(["recipe", "show", str(path)]), expected)


def test_aliases_below_the_bound_are_copies_and_merge_keys_work():
    wide = "a: &a [" + ", ".join(["x"] * 100) + "]\nb: [" + ", ".join(["*a"] * 100) + "]\n"
    parsed = parse_yaml(wide, "wide")
    assert len(parsed["b"]) * len(parsed["b"][0]) == 10_000 < MAX_NODES
    parsed["b"][0].append("y")
    assert len(parsed["a"]) == len(parsed["b"][1]) == 100
    merged = parse_yaml("base: &base {steps: 3, batch_size: 2}\ntrainer: {<<: *base, steps: 5}\n", "merge")
    assert merged["trainer"] == {"steps": 5, "batch_size": 2}


@pytest.mark.parametrize(
    "override, expected",
    [
        (f"seed={2**70}", "does not fit in 64 bits"),
        ("seed=" + "9" * 5000, "integer of 5000 characters"),
        (f"seed={2**40}", "seed: must be in 0..4294967295"),
        (f"eval.seed={2**63}", "eval.seed: seed must be in 0..4294967295"),
        ("eval.max_examples=0", "eval.max_examples: max_examples must be >= 1, got 0"),
        ("eval.max_examples=-2", "eval.max_examples: max_examples must be >= 1, got -2"),
        ("data={[1]: 2}", "a list cannot be a key"),
        ("a." * 70 + "b=1", "nested more than 64 deep"),
    ],
)
def test_hostile_overrides_are_one_line(override, expected, capsys):
    _one_line(capsys, main(["recipe", "show", QUICKSTART, override]), expected)


def test_merge_key_override_succeeds(capsys):
    assert main(["recipe", "show", QUICKSTART, "trainer={<<: {steps: 7}, batch_size: 4}"]) == 0
    shown = capsys.readouterr().out
    assert "steps: 7" in shown and "batch_size: 4" in shown


def test_devices_fifos_and_large_files_are_refused_without_reading(tiny_overrides, tmp_path, capsys):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    large = tmp_path / "large.yaml"
    with open(large, "wb") as file:
        file.truncate(5 * 2**20)
    for path, expected in (
        ("/dev/zero", "is not a regular file"),
        ("/dev/urandom", "is not a regular file"),
        (str(fifo), "is not a regular file"),
        (str(large), "larger than 4 MiB"),
    ):
        _one_line(capsys, main(["recipe", "show", path]), f"{path}: {expected}")
    workdir = tmp_path / "run"
    for kind in ("text_file", "token_file"):
        for path in ("/dev/zero", str(fifo)):
            tiny = [item for item in tiny_overrides if not item.startswith("data.")]
            arguments = ["run", QUICKSTART, "--workdir", str(workdir), *tiny, f"data={kind}", f"data.path={path}"]
            if kind == "token_file":
                arguments.append("data.vocabulary=8")
            _one_line(capsys, main(arguments), f"{kind}: {path} is not a regular file")


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["--prefix", f"1 {2**70}"], "given token ids must be in 0.."),
        (["--guidance", "1e308", "--label", "0"], "--guidance: must be at most 3.4e+38 in magnitude"),
        (["--guidance", "1e30"], "--guidance must be in -1e+06..1e+06"),
        (["--seed", "9" * 5000], "got an integer of 5000 characters"),
        (["--seed", str(2**64)], "must be >= 0 and <= 4294967295"),
    ],
)
def test_hostile_sample_options_are_one_line(full_run, arguments, expected, tmp_path, capsys):
    workdir = full_run[0]
    before = sorted(workdir.rglob("*"))
    _one_line(capsys, main(["sample", str(workdir), "--num", "2", *arguments]), expected)
    assert sorted(workdir.rglob("*")) == before


def test_fixed_npz_is_one_line(full_run, tmp_path, capsys):
    import numpy as np

    archive = tmp_path / "fixed.npz"
    np.savez(archive, tokens=np.zeros(4, np.int64))
    _one_line(capsys, main(["sample", str(full_run[0]), "--num", "2", "--fixed", str(archive)]), "an .npz archive")


def test_closed_pipe_ends_quietly_and_unknown_backend_is_one_line():
    command = [sys.executable, "-c", "import sys; from ddiff.runner import main; sys.exit(main())"]
    read_end, write_end = os.pipe()
    os.close(read_end)
    listing = subprocess.run([*command, "plugins"], stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    os.close(write_end)
    assert listing.returncode == 141 and listing.stderr == b""
    env = {**os.environ, "JAX_PLATFORMS": "tpu"}
    result = subprocess.run(
        [*command, "recipe", "show", QUICKSTART], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("ddiff: error: JAX_PLATFORMS=tpu: Unable to initialize backend 'tpu'")
    assert result.stderr.count("\n") == 1
    # With no CUDA plugin installed, JAX asserts rather than raising: still one line.
    env = {**os.environ, "JAX_PLATFORMS": "cuda"}
    result = subprocess.run(
        [*command, "recipe", "show", QUICKSTART], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stderr.startswith("ddiff: error: JAX_PLATFORMS=cuda: ")
    assert result.stderr.count("\n") == 1


# ------------------------------------------------------------------ random recipes

_SCALAR_TEXTS = st.sampled_from(
    ["1", "-0", "0x1F", "0o17", "1e400", "-1e-400", ".nan", ".inf", "~", "null", "true", "no", "''", "'x'",
     '"a\\nb"', "2001-12-14", "!!binary aGVsbG8=", "!!str 3", "9" * 30, "9" * 5000, "3.5", "cosine", "md4",
     "kind", "steps", "!!python/object:os.system x", "!!set {a, b}", "<<", "a b c"]
)
_KEY_TEXTS = st.sampled_from(
    ["seed", "data", "process", "network", "trainer", "eval", "kind", "steps", "schedule", "length", "dim",
     "1", "~", "true", "[1]", "{a: 1}", "<<", "'x y'", "max_examples"]
)


@st.composite
def _yaml_node(draw, depth: int = 0, anchors: list | None = None) -> str:
    """Flow-style YAML text of a random node, with anchors and aliases to earlier ones."""
    anchors = [] if anchors is None else anchors
    choice = draw(st.integers(0, 9 if depth < 4 else 4))
    if choice <= 2 or not anchors and choice == 3:
        text = draw(_SCALAR_TEXTS)
    elif choice == 3:
        return "*" + draw(st.sampled_from(anchors))
    elif choice == 4:
        text = "[" * draw(st.integers(1, 80)) + "]" * draw(st.integers(1, 80))
    elif choice <= 6:
        items = draw(st.lists(_yaml_node(depth + 1, anchors), max_size=4))
        text = "[" + ", ".join(items) + "]"
    else:
        pairs = draw(st.lists(st.tuples(_KEY_TEXTS, _yaml_node(depth + 1, anchors)), max_size=4))
        text = "{" + ", ".join(f"{key}: {value}" for key, value in pairs) + "}"
    if draw(st.booleans()):
        name = f"a{len(anchors)}"
        anchors.append(name)
        return f"&{name} {text}"
    return text


@st.composite
def _recipe_text(draw) -> str:
    anchors: list = []
    sections = draw(st.lists(st.tuples(_KEY_TEXTS, _yaml_node(1, anchors)), max_size=5))
    if draw(st.booleans()):
        return _billion_laughs(draw(st.integers(2, 8)), draw(st.integers(2, 12)))
    return "".join(f"{key}: {value}\n" for key, value in sections)


_OVERRIDE_KEYS = st.sampled_from(
    ["seed", "data", "data.length", "trainer", "trainer.steps", "eval.max_examples", "eval.seed", "eval",
     "process.schedule", "network.dim", "sampler", "bogus.deep", "a..b", "", "trainer.steps.x", "data.kind"]
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(recipe=_recipe_text(), overrides=st.lists(st.tuples(_OVERRIDE_KEYS, _yaml_node()), max_size=3))
def test_random_recipes_and_overrides_end_in_one_line_or_load(recipe, overrides, tmp_path_factory, capsys):
    path = tmp_path_factory.mktemp("random") / "r.yaml"
    path.write_text(recipe)
    for target in (str(path), QUICKSTART):
        arguments = [f"{key}={value}" for key, value in overrides]
        try:
            status = main(["recipe", "show", target, *arguments])
        except RecursionError:
            pytest.fail(f"RecursionError for {target} {arguments}")
        captured = capsys.readouterr()
        if status != 0:
            assert status == 2, captured
            assert captured.err.startswith("ddiff: error: ") and captured.err.count("\n") == 1, captured.err
        try:
            ddiff.runner.load_recipe(target, arguments)
        except ddiff.DdiffError:
            assert status == 2
        else:
            assert status == 0
