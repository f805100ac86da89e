"""Protocol calls are shape- and dtype-checked when traced; a flag turns the checks off."""

import jax
import jax.numpy as jnp
import pytest
from jaxtyping import TypeCheckError

import ddiff


class _WrongShape(ddiff.AbstractMeanParameterization):
    """Returns one position too many: a plugin bug the contract must catch."""

    def output_channels(self, process):
        return process.vocab_size

    def log_mean(self, output, x_t, t, process):
        return jnp.zeros((x_t.shape[0] + 1, process.vocab_size))


class _WrongDtype(ddiff.AbstractSchedule):
    def alpha(self, t):
        return jnp.int32(1)


def _process():
    return ddiff.build_component(
        "process", {"kind": "masked", "schedule": "linear"}, supplied={"vocab_size": 4}
    )


def test_wrong_return_shape_fails_at_first_trace_naming_the_shape():
    process = _process()
    parameterization = _WrongShape()
    x_t = jnp.zeros(6, jnp.int32)
    output = jnp.zeros((6, 4))
    with pytest.raises(TypeCheckError) as info:
        jax.jit(lambda o, x: parameterization.log_mean(o, x, jnp.zeros(()), process))(output, x_t)
    message = str(info.value)
    assert "return value" in message and "seq vocab" in message and "seq=6" in message


def test_wrong_argument_shape_is_named():
    process = _process()
    with pytest.raises(TypeCheckError, match="x0"):
        process.marginal_probs(jnp.zeros((2, 3), jnp.int32), jnp.zeros(()))


def test_wrong_dtype_fails():
    with pytest.raises(TypeCheckError, match="Float"):
        _WrongDtype().alpha(jnp.zeros(()))


def test_flag_turns_checks_off():
    with ddiff.typecheck(False):
        assert _WrongDtype().alpha(jnp.zeros(())) == 1
    assert ddiff.typecheck_enabled()


class _Bare(ddiff.AbstractSchedule):
    """A third-party override that writes no annotations: still checked, left as written."""

    def alpha(self, t):
        return jnp.int32(1)


def test_a_bare_override_is_checked_and_keeps_what_was_written():
    assert _Bare.alpha.__annotations__ == {}
    with pytest.raises(TypeCheckError, match="Float"):
        _Bare().alpha(jnp.zeros(()))


def _annotation_text(hint) -> str:
    return repr(hint).replace("typing.", "")


def _overrides():
    """(class, method name, override, contract) of every method of every built-in class that
    overrides an annotated protocol method."""
    import ddiff_plugins  # noqa: F401  (the built-in plugins are loaded by the registry)

    ddiff.default_registry()
    seen, stack = set(), [ddiff.AbstractCheckedModule]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls in seen or not cls.__module__.startswith("ddiff_plugins"):
            seen.add(cls)
            continue
        seen.add(cls)
        for name, method in vars(cls).items():
            contract = getattr(method, "__ddiff_contract__", None)
            if contract and contract is not getattr(method, "__wrapped__", method).__annotations__:
                yield cls, name, method.__wrapped__, contract


def test_built_in_overrides_write_the_protocols_annotations():
    """Readers and pyright see each override's types: every built-in override writes, for
    each argument and the return value the protocol annotates, the protocol's annotation."""
    import inspect

    problems, checked = [], 0
    for cls, name, override, contract in _overrides():
        parameters = inspect.signature(override).parameters
        for key, hint in contract.items():
            if key != "return" and key not in parameters:
                continue
            checked += 1
            written = override.__annotations__.get(key)
            if written is None or _annotation_text(written) != _annotation_text(hint):
                problems.append(f"{cls.__module__}.{cls.__qualname__}.{name} {key}: {written!r} != {hint!r}")
    assert checked > 300 and not problems, problems[:20]
