"""The conformance suite: every applicable check for a registered objective or sampler,
by name, as plain functions or as one parametrized pytest test."""

import dataclasses
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax

from ddiff._builder import build_component
from ddiff._capabilities import CONTINUOUS_TIME, DISCRETE_TIME, MASKED, SCALAR, check_compatibility
from ddiff._errors import DdiffError
from ddiff._model import DiffusionModel
from ddiff._registry import Registry, default_registry
from ddiff.testing._checks import (
    CheckResult,
    check_discrete_bound,
    check_entropy_bound,
    check_sampler,
    check_schedule_invariance,
    check_tight,
)
from ddiff.testing._exact import oracle_model, oracle_network, oracle_output
from ddiff.testing._toy import ToyDistribution, class_conditional_toy, toy_distributions

Spec = str | Mapping[str, Any]

DEFAULT_PROCESS: Mapping[str, Any] = {"kind": "masked", "schedule": {"kind": "linear"}}
"""The process a component is checked with when its requirements allow it."""
DEFAULT_PARAMETERIZATION: Mapping[str, Any] = {"kind": "mean"}
"""The parameterization the oracle is read through when the requirements allow it."""
DEFAULT_NETWORK: Mapping[str, Any] = {"kind": "transformer", "dim": 16, "depth": 1, "heads": 2}
"""The untrained network of the entropy-bound check (any model bounds H(p))."""
DISCRETE_STEPS = (1, 4, 32)
"""The step counts T at which a discrete-time objective's gap must shrink."""

SAMPLER_CASES = {
    "exact[none/markov]": ("none", "markov"),
    "exact[labels+infill/classes]": ("labels+infill", "classes"),
    "exact[labels/classes]": ("labels", "classes"),
}
"""Sampler checks: (conditioning, toy). ``classes`` is a class-conditional toy; with
``labels+infill`` every sample has a label and about half of its positions given, with
``labels`` only the label. :attr:`Setup.sampler_cases` chooses which run."""

DEFAULT_SAMPLER_CASES = ("exact[none/markov]", "exact[labels+infill/classes]")
"""The :data:`SAMPLER_CASES` run unless :attr:`Setup.sampler_cases` says otherwise."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the suite builds components from: recipe-style sections (``{"kind": ...}``)
    for the process, parameterization and untrained network, the toy size, sample sizes
    and tolerances.

    Attributes:
        process: process section (default: masked with the linear schedule).
        parameterization: parameterization section (default: mean).
        network: the untrained network of the entropy-bound check.
        vocab_size, seq_len: the toy's V and D (V^D sequences are enumerated).
        seed: seed of every check (each check folds in its own name).
        num_examples: draws per estimated mean of an objective (a sixteenth of it for the
            entropy bound, whose margin is wide).
        num_samples: samples per sampler check.
        z: standard errors allowed in Monte Carlo comparisons.
        alpha: false-alarm rate of the sampler chi-square test.
        sampler_cases: which :data:`SAMPLER_CASES` a sampler is checked on (default:
            unconditional, and labels with infilling). A sampler whose infilling is
            approximate by design (projection on a process whose noisy tokens can look
            clean) names ``exact[labels/classes]`` instead, and says so.
    """

    process: Spec = dataclasses.field(default_factory=lambda: dict(DEFAULT_PROCESS))
    parameterization: Spec = dataclasses.field(default_factory=lambda: dict(DEFAULT_PARAMETERIZATION))
    network: Spec = dataclasses.field(default_factory=lambda: dict(DEFAULT_NETWORK))
    vocab_size: int = 3
    seq_len: int = 4
    seed: int = 0
    num_examples: int = 2**16
    num_samples: int = 2**13
    z: float = 4.0
    alpha: float = 1e-3
    sampler_cases: tuple[str, ...] = DEFAULT_SAMPLER_CASES
    registry: Registry | None = None

    def build(self, slot: str, spec: Spec, num_classes: int = 0) -> Any:
        return build_component(
            slot,
            spec,
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
            num_classes=num_classes,
            registry=self.registry or default_registry(),
        )

    def process_with(self, schedule: Spec | None = None) -> Any:
        spec = self.process if isinstance(self.process, Mapping) else {"kind": self.process}
        if schedule is not None:
            spec = {**spec, "schedule": schedule}
        return self.build("process", spec)

    def key(self, name: str) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), zlib.crc32(name.encode()))

    def toys(self) -> dict[str, ToyDistribution]:
        return toy_distributions(self.vocab_size, self.seq_len, seed=self.seed)

    def oracle(self, distribution: ToyDistribution, process: Any | None = None) -> DiffusionModel:
        process = self.process_with() if process is None else process
        parameterization = self.build("parameterization", self.parameterization)
        return oracle_model(distribution, process, parameterization)


def _registry(setup: Setup) -> Registry:
    return setup.registry or default_registry()


def _check_pairing(setup: Setup, slot: str, name: str, component: Any, model: DiffusionModel) -> None:
    check_compatibility(
        {
            slot: (name, component),
            "process": ("process", model.process),
            "parameterization": ("parameterization", model.parameterization),
            "network": ("network", model.network),
            "schedule": ("schedule", model.process.schedule),
        },
        source="ddiff.testing",
    )


def objective_checks(name: str, setup: Setup | None = None, **objective_arguments: Any) -> dict[str, Callable[[], CheckResult]]:
    """The checks that apply to the objective registered as ``name``, by check name, each a
    function that runs it. Building this mapping does no numerical work.

    Continuous-time objectives (capability ``continuous_time``): ``tight[markov]``,
    ``tight[parity]`` (a), ``entropy_bound[untrained]`` and ``entropy_bound[mismatched]``
    (c), and for a masked process ``schedule_invariance`` (e) over every registered scalar
    schedule. Discrete-time objectives (``discrete_time``, built with ``steps=T``):
    ``discrete_bound[parity]`` (b) at T in :data:`DISCRETE_STEPS`, and the entropy bounds.
    Any other objective gets the entropy bounds.

    Arguments:
        name: the registered objective.
        setup: process, parameterization, sizes and tolerances (:class:`Setup`).
        **objective_arguments: the objective's own arguments.
    """
    setup = setup or Setup()
    cls = _registry(setup).get("objective", name)
    provided = frozenset(getattr(cls, "provides", frozenset()))
    spec = {"kind": name, **objective_arguments}

    def objective(**extra: Any) -> Any:
        return setup.build("objective", {**spec, **extra})

    def subject(toy: str) -> str:
        return f"objective {name!r} on toy {toy!r}"

    def tight(toy: str) -> Callable[[], CheckResult]:
        def run() -> CheckResult:
            model = setup.oracle(setup.toys()[toy])
            built = objective()
            _check_pairing(setup, "objective", name, built, model)
            return check_tight(
                built, model, setup.toys()[toy], key=setup.key(f"tight{toy}"),
                num_examples=setup.num_examples, z=setup.z, subject=subject(toy),
            )

        return run

    def discrete(toy: str) -> Callable[[], CheckResult]:
        def run() -> CheckResult:
            model = setup.oracle(setup.toys()[toy])
            _check_pairing(setup, "objective", name, objective(steps=1), model)
            return check_discrete_bound(
                lambda steps: objective(steps=steps), model, setup.toys()[toy],
                key=setup.key(f"discrete{toy}"), steps=DISCRETE_STEPS,
                num_examples=setup.num_examples, z=setup.z, subject=subject(toy),
            )

        return run

    def entropy(kind: str) -> Callable[[], CheckResult]:
        def run() -> CheckResult:
            toy = setup.toys()["markov"]
            process = setup.process_with()
            parameterization = setup.build("parameterization", setup.parameterization)
            if kind == "untrained":
                network = setup.build("network", setup.network).build(
                    num_states=process.num_states,
                    num_outputs=parameterization.output_channels(process),
                    seq_len=setup.seq_len,
                    num_classes=0,
                    key=setup.key("network"),
                )
                model = DiffusionModel(network=network, parameterization=parameterization, process=process)
            else:
                model = oracle_model(setup.toys()["dense"], process, parameterization)
            built = objective(steps=DISCRETE_STEPS[-1]) if DISCRETE_TIME in provided else objective()
            _check_pairing(setup, "objective", name, built, model)
            return check_entropy_bound(
                built, model, toy, key=setup.key(f"entropy{kind}"),
                num_examples=max(setup.num_examples // 16, 2), z=setup.z,
                subject=f"objective {name!r} with {kind} network on toy 'markov'",
            )

        return run

    def invariance() -> CheckResult:
        registry = _registry(setup)
        schedules = {}
        for schedule_name in registry.names("schedule"):
            if SCALAR in getattr(registry.get("schedule", schedule_name), "provides", ()):
                schedules[schedule_name] = setup.build("schedule", schedule_name)
        toy = setup.toys()["markov"]
        wrong = setup.toys()["dense"]
        parameterization = setup.build("parameterization", setup.parameterization)

        def make_model(schedule: Any) -> DiffusionModel:
            process = eqx.tree_at(lambda p: p.schedule, setup.process_with(), schedule)
            network = oracle_network(
                wrong, process, output=oracle_output(parameterization), time_conditioned=False
            )
            return DiffusionModel(network=network, parameterization=parameterization, process=process)

        return check_schedule_invariance(
            objective(), make_model, schedules, toy, key=setup.key("invariance"),
            num_examples=setup.num_examples, z=setup.z,
            subject=f"objective {name!r} with a time-independent wrong oracle on toy 'markov'",
        )

    checks: dict[str, Callable[[], CheckResult]] = {}
    if CONTINUOUS_TIME in provided:
        checks["tight[markov]"] = tight("markov")
        checks["tight[parity]"] = tight("parity")
    if DISCRETE_TIME in provided:
        checks["discrete_bound[parity]"] = discrete("parity")
    checks["entropy_bound[untrained]"] = entropy("untrained")
    checks["entropy_bound[mismatched]"] = entropy("mismatched")
    if CONTINUOUS_TIME in provided and _is_masked_with_schedule(setup):
        checks["schedule_invariance"] = invariance
    return checks


def _is_masked_with_schedule(setup: Setup) -> bool:
    process = setup.process_with()
    return MASKED in process.capabilities() and SCALAR in process.schedule.capabilities()


def sampler_checks(
    name: str, setup: Setup | None = None, **sampler_arguments: Any
) -> dict[str, Callable[[], CheckResult]]:
    """The checks of the sampler registered as ``name``, by check name (the
    :attr:`Setup.sampler_cases` of :data:`SAMPLER_CASES`): driven by the oracle it must
    reproduce p unconditionally, and given labels and positions (infilling) (d). Building this mapping does no numerical
    work.

    Arguments:
        name: the registered sampler.
        setup: process, parameterization, sizes and tolerances (:class:`Setup`).
        **sampler_arguments: the sampler's own arguments (e.g. ``steps``).
    """
    setup = setup or Setup()
    _registry(setup).get("sampler", name)
    spec = {"kind": name, **sampler_arguments}

    def case(conditioning: str, toy_name: str) -> Callable[[], CheckResult]:
        def run() -> CheckResult:
            if toy_name == "classes":
                toy = class_conditional_toy(setup.vocab_size, setup.seq_len, seed=setup.seed)
            else:
                toy = setup.toys()[toy_name]
            model = setup.oracle(toy)
            sampler = setup.build("sampler", spec)
            _check_pairing(setup, "sampler", name, sampler, model)
            return check_sampler(
                sampler, model, toy, key=setup.key(f"sampler{conditioning}{toy_name}"),
                conditioning=conditioning, num_samples=setup.num_samples, alpha=setup.alpha,
                subject=f"sampler {name!r} ({_arguments(sampler_arguments)}) on toy {toy_name!r}",
            )

        return run

    unknown = sorted(set(setup.sampler_cases) - set(SAMPLER_CASES))
    if unknown:
        raise DdiffError(
            f"unknown sampler case(s) {', '.join(unknown)} in Setup.sampler_cases "
            f"(available: {', '.join(SAMPLER_CASES)})"
        )
    return {check: case(*SAMPLER_CASES[check]) for check in setup.sampler_cases}


def _arguments(arguments: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items()) or "defaults"


def run_objective_conformance(name: str, setup: Setup | None = None, **objective_arguments: Any) -> list[CheckResult]:
    """Run every check of an objective; returns the results (failed ones included)."""
    return [check() for check in objective_checks(name, setup, **objective_arguments).values()]


def run_sampler_conformance(name: str, setup: Setup | None = None, **sampler_arguments: Any) -> list[CheckResult]:
    """Run every check of a sampler; returns the results (failed ones included)."""
    return [check() for check in sampler_checks(name, setup, **sampler_arguments).values()]


def _pytest_function(kind: str, name: str, checks: dict[str, Callable[[], CheckResult]]) -> Callable:
    import pytest

    @pytest.mark.parametrize("check", list(checks))
    def test(check: str) -> None:
        result = checks[check]()
        print(result)
        result.raise_if_failed()

    test.__name__ = f"test_{kind}_conformance_{name}"
    test.__qualname__ = test.__name__
    test.__doc__ = f"ddiff.testing conformance of {kind} {name!r}."
    test.ddiff_conformance = (kind, name)
    return test


def objective_conformance(name: str, setup: Setup | None = None, **objective_arguments: Any) -> Callable:
    """A pytest test function running every check of objective ``name``, one test item
    per check. In a test module::

        test_my_objective = ddiff.testing.objective_conformance("my_objective")
    """
    try:
        checks = objective_checks(name, setup, **objective_arguments)
    except DdiffError as error:
        raise DdiffError(f"objective_conformance({name!r}): {error}") from None
    return _pytest_function("objective", name, checks)


def sampler_conformance(name: str, setup: Setup | None = None, **sampler_arguments: Any) -> Callable:
    """A pytest test function running every check of sampler ``name``, one test item per
    check. In a test module::

        test_my_sampler = ddiff.testing.sampler_conformance("my_sampler", steps=256)
    """
    try:
        checks = sampler_checks(name, setup, **sampler_arguments)
    except DdiffError as error:
        raise DdiffError(f"sampler_conformance({name!r}): {error}") from None
    return _pytest_function("sampler", name, checks)
