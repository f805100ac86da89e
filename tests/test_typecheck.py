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
