"""The two layers a plugin author sees: the authoring API (``ddiff``, ``ddiff.testing``,
``ddiff.capabilities``) never imports the running layer (``ddiff.runner``); each public
package lists its names in a written-out ``__all__``, every one documented; and the
shared helpers they export (log-space numerics, compiled-function sharing) hold."""

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ddiff
import ddiff.runner
import ddiff.testing

ROOT = Path(__file__).resolve().parent.parent
PUBLIC = ("ddiff", "ddiff.nn", "ddiff.runner", "ddiff.testing", "ddiff.capabilities")
RUNNER = "ddiff.runner"


# --------------------------------------------------------------------------- layering


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module an import statement of the file names (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _authoring_files() -> list[tuple[Path, str]]:
    """(file, its package) of the authoring layer and the built-in plugins."""
    files = []
    for path in sorted((ROOT / "ddiff").rglob("*.py")):
        relative = path.relative_to(ROOT)
        if relative.parts[1] == "runner" or relative.name == "__main__.py":
            continue  # ``python -m ddiff`` is the command line: it is the running layer
        files.append((path, ".".join(relative.parent.parts)))
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        parts = ("ddiff_plugins", *path.relative_to(ROOT / "plugins").parent.parts)
        files.append((path, ".".join(parts)))
    return files


def test_no_import_statement_of_the_authoring_layer_names_the_runner():
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path, package in _authoring_files()
        for name in _imported_modules(path, package)
        if name == RUNNER or name.startswith(f"{RUNNER}.")
    ]
    assert len(_authoring_files()) > 30 and not offenders, offenders


def test_plugins_import_only_the_public_api():
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path, package in _authoring_files()
        if package.startswith("ddiff_plugins")
        for name in _imported_modules(path, package)
        if name.startswith("ddiff.") and name.split(".")[1].startswith("_")
    ]
    assert not offenders, offenders


def test_importing_the_authoring_layer_and_every_plugin_loads_no_runner_module():
    code = (
        "import sys, ddiff, ddiff.testing\n"
        "ddiff.default_registry()\n"  # loads every plugin of the entry-point group
        "import ddiff_plugins.datasets.gpt2\n"
        "loaded = sorted(m for m in sys.modules if m == 'ddiff.runner' or m.startswith('ddiff.runner.'))\n"
        "plugins = sorted(m for m in sys.modules if m.startswith('ddiff_plugins.'))\n"
        "print(loaded, len(plugins))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded, count = result.stdout.strip().rsplit(" ", 1)
    assert loaded == "[]" and int(count) >= 9, result.stdout


# --------------------------------------------------------------------------- curated names


def _all_assignment(module_name: str) -> ast.AST:
    path = Path(importlib.import_module(module_name).__file__)
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return node.value
    raise AssertionError(f"{module_name} has no __all__")


@pytest.mark.parametrize("module_name", PUBLIC)
def test_all_is_written_out_and_complete(module_name):
    value = _all_assignment(module_name)
    assert isinstance(value, ast.List) and all(isinstance(e, ast.Constant) for e in value.elts), (
        f"{module_name}.__all__ must be a list of names written out"
    )
    module = importlib.import_module(module_name)
    names = module.__all__
    assert len(names) == len(set(names)), "a name is listed twice"
    missing = [name for name in names if not hasattr(module, name)]
    assert not missing, missing


def test_the_layers_export_disjoint_names():
    assert not set(ddiff.__all__) & set(ddiff.runner.__all__)


def _attribute_docstrings(path: Path) -> dict[str, str]:
    """Every name a module-level assignment binds, with the string literal that follows the
    assignment (its attribute docstring) or ``""``."""
    body = ast.parse(path.read_text()).body
    documented = {}
    for index, node in enumerate(body):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        following = body[index + 1] if index + 1 < len(body) else None
        doc = ""
        if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
            doc = following.value.value if isinstance(following.value.value, str) else ""
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    documented[name.id] = doc
    return documented


def _defining_file(module_name: str, name: str) -> Path:
    """The file whose module-level assignment defines ``name`` as exported by
    ``module_name``, following ``from x import name`` re-exports."""
    module = importlib.import_module(module_name)
    path = Path(module.__file__)
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            return _defining_file(node.module, name)
    return path


def _documentation(module_name: str, name: str) -> str:
    """The docstring of a public name: the attribute docstring of a name bound by an
    assignment (a constant, a typing alias), else the class's, function's or module's own."""
    value = getattr(importlib.import_module(module_name), name)
    if inspect.ismodule(value):
        return value.__doc__ or ""
    assigned = _attribute_docstrings(_defining_file(module_name, name))
    if name in assigned:
        return assigned[name]
    doc = value.__doc__ or ""
    if inspect.isclass(value) and doc.startswith(f"{value.__name__}("):
        return ""  # the signature a dataclass writes for a class without a docstring
    return doc


@pytest.mark.parametrize("module_name", PUBLIC)
def test_every_public_name_is_documented(module_name):
    names = importlib.import_module(module_name).__all__
    undocumented = [name for name in names if not _documentation(module_name, name).strip()]
    assert not undocumented, f"{module_name}: no docstring for {undocumented}"


def test_the_docstring_check_can_fail():
    assert _attribute_docstrings(ROOT / "ddiff" / "_registry.py")["DISABLE_AUTOLOAD_ENV"] == ""
    assert _documentation("ddiff", "Key").startswith("A JAX PRNG key")


# --------------------------------------------------------------------------- shared numerics


@jax.jit
def _numerics(probs, rows):
    """The helpers' values and gradients, in one compiled program."""

    def total(rows):
        normalized = ddiff.log_normalize(rows)
        return jnp.sum(jnp.where(jnp.isfinite(normalized), normalized, 0.0))

    def logs(probs):
        return jnp.sum(jnp.where(probs > 0, ddiff.safe_log(probs), 0.0))

    return (
        ddiff.safe_log(probs), jax.grad(logs)(probs),
        ddiff.log_sum_exp(rows), ddiff.log_normalize(rows), jax.grad(total)(rows),
    )  # fmt: skip


def test_log_space_helpers_are_exact_and_never_nan():
    """log 0 = -inf with a zero gradient; a row that is -inf throughout stays -inf under
    log-sum-exp and normalisation, and no gradient is NaN."""
    probs = jnp.array([0.0, 0.25, 1.0])
    rows = jnp.array([[0.0, jnp.log(3.0), -jnp.inf], [-jnp.inf, -jnp.inf, -jnp.inf]])
    logs, log_gradient, totals, normalized, gradient = _numerics(probs, rows)
    np.testing.assert_array_equal(logs, [-np.inf, np.log(np.float32(0.25)), 0.0])
    np.testing.assert_array_equal(log_gradient, [0.0, 4.0, 1.0])
    np.testing.assert_allclose(totals[:, 0], [np.log(4.0), -np.inf], rtol=1e-6)
    np.testing.assert_allclose(np.exp(normalized[0]), [0.25, 0.75, 0.0], rtol=1e-6)
    assert np.all(np.isneginf(normalized[1])) and np.all(np.isfinite(gradient))


def test_discrete_time_objectives_share_the_step_check_and_grid():
    with pytest.raises(ddiff.RecipeError, match=r"objective.steps: steps must be >= 1, got 0"):
        ddiff.build_component("objective", {"kind": "d3pm_vb", "steps": 0}, vocab_size=3, seq_len=2)
    objective = ddiff.build_component("objective", {"kind": "md4_discrete_elbo", "steps": 4})
    assert isinstance(objective, ddiff.AbstractDiscreteTimeObjective)
    times = np.asarray(objective.sample_times(jax.random.PRNGKey(0), 8)) * 4
    np.testing.assert_allclose(times, np.round(times), atol=1e-6)
    assert sorted(np.round(times).astype(int).tolist()) == [1, 1, 2, 2, 3, 3, 4, 4]


def test_sample_keys_depend_on_the_global_index_only():
    key = jax.random.PRNGKey(7)
    whole = ddiff.sample_keys(key, 0, 8)
    np.testing.assert_array_equal(ddiff.sample_keys(key, 4, 4), whole[4:])
    np.testing.assert_array_equal(whole[3], jax.random.fold_in(key, 3))


# --------------------------------------------------------------------------- compiled functions


def test_compiled_functions_are_shared_by_static_parts_and_take_arrays_as_arguments():
    import equinox as eqx

    from ddiff.runner.trainer.compiled import compiled

    class Scaled(eqx.Module):
        scale: jax.Array
        power: int = eqx.field(static=True)

    built = []

    def factory(component, *, offset):
        built.append(component)

        def apply(arrays, x):
            (component_arrays,) = arrays
            full = eqx.combine(component_arrays, component)
            return full.scale * x**full.power + offset

        return apply

    two, three = Scaled(jnp.asarray(2.0), 1), Scaled(jnp.asarray(3.0), 1)
    assert float(compiled(factory, (two,), offset=1)(5.0)) == 11.0
    assert float(compiled(factory, (three,), offset=1)(5.0)) == 16.0  # same program, own array
    assert len(built) == 1 and built[0].scale is None
    assert float(compiled(factory, (Scaled(jnp.asarray(2.0), 2),), offset=1)(5.0)) == 51.0
    assert float(compiled(factory, (two,), offset=2)(5.0)) == 12.0
    assert float(compiled(factory, (Scaled(jnp.ones(2), 1),), offset=1)(5.0)[0]) == 6.0
    assert len(built) == 4
