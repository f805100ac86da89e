"""The conformance suite: every applicable check for a registered objective or sampler,
by name, as plain functions or as one parametrized pytest test."""

import dataclasses
import json
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ddiff._builder import build_component
from ddiff._capabilities import (
    CONTINUOUS_TIME,
    DISCRETE_TIME,
    MASKED,
    SCALAR,
    TIME_INDEPENDENT,
    check_compatibility,
)
from ddiff._constant import partition_trainable
from ddiff._errors import DdiffError
from ddiff._model import DiffusionModel
from ddiff._registry import Registry, default_registry
from ddiff._schedule import AbstractSchedule
from ddiff.testing._bounds import exact_bound_terms
from ddiff.testing._exact import oracle_model, oracle_network, oracle_output
from ddiff.testing._objective_checks import (
    check_bound_terms,
    check_discrete_bound,
    check_entropy_bound,
    check_schedule_invariance,
    check_tight,
)
from ddiff.testing._results import CheckResult
from ddiff.testing._sampler_checks import check_chain_limit, check_reverse_chain, check_sampler
from ddiff.testing._table import table_model
from ddiff.testing._toy import ToyDistribution, class_conditional_toy, toy_distributions

Spec = str | Mapping[str, Any]

DEFAULT_PROCESS: Mapping[str, Any] = {"kind": "masked", "schedule": {"kind": "linear"}}
"""The process a component is checked with when its requirements allow it."""
DEFAULT_PARAMETERIZATION: Mapping[str, Any] = {"kind": "mean"}
"""The parameterization the oracle is read through when the requirements allow it."""
DEFAULT_NETWORK: Mapping[str, Any] = {"kind": "transformer", "dim": 16, "depth": 1, "heads": 2}
"""A small untrained transformer section, for tests that need a real network."""
DISCRETE_STEPS = (1, 4, 32)
"""The step counts T at which a discrete-time objective's gap must shrink; the exact
per-x_0 check (g) runs at the second, T = 4."""

SAMPLER_CASES = {
    "exact[none/markov]": ("none", "markov"),
    "exact[labels+infill/classes]": ("labels+infill", "classes"),
    "exact[labels/classes]": ("labels", "classes"),
}
"""Checks of a sampler against the data: (conditioning, toy). ``classes`` is a
class-conditional toy; with ``labels+infill`` every sample has a label and one of four
infilling patterns (about half of the positions given), with ``labels`` only the label.
For a sampler that declares its chain (:meth:`ddiff.AbstractSampler.reverse_chain`)
the check is exact and deterministic (:func:`check_chain_limit`); otherwise the sampler
is run with the exact denoiser (:func:`check_sampler`). :attr:`Setup.sampler_cases`
chooses which run."""

DEFAULT_SAMPLER_CASES = ("exact[none/markov]", "exact[labels+infill/classes]")
"""The :data:`SAMPLER_CASES` run unless :attr:`Setup.sampler_cases` says otherwise."""

LAW_CASES = {
    "chain[none]": ("none", "markov", 0.0),
    "chain[labels+infill+guidance]": ("labels+infill", "classes", None),
}
"""Checks of a sampler against the exact law of its own chain with a table model whose
predictions depend on t (:func:`check_reverse_chain`): (conditioning, toy, guidance; None
is :attr:`Setup.guidance`)."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What the suite builds components from: recipe-style sections (``{"kind": ...}``)
    for the process and parameterization, the toy size, sample sizes and tolerances.

    Attributes:
        process: process section (default: masked with the linear schedule).
        parameterization: parameterization section (default: mean).
        vocab_size, seq_len: the toy's V and D (V^D sequences are enumerated).
        seed: seed of every check (each check folds in its own name) and of the table
            models.
        num_examples: draws per estimated mean of an objective (a sixteenth of it for the
            entropy bound, whose margin is wide); the exact per-x_0 check (g) spreads them
            over its ``bound_sequences`` clean sequences.
        num_samples: samples per sampled sampler check.
        z: standard errors allowed in Monte Carlo comparisons.
        alpha: false-alarm rate of the sampler chi-square tests.
        sampler_cases: which :data:`SAMPLER_CASES` a sampler is checked on against the data
            (default: unconditional, and labels with infilling). A sampler whose infilling
            is approximate by design (projection on a process whose noisy tokens can look
            clean) names ``exact[labels/classes]`` instead, and says so.
        chain_cases: which :data:`LAW_CASES` a sampler is checked on against its own chain.
        chain_steps: the steps a sampler with a ``steps`` argument takes in the chain checks
            (few steps keep each step's effect large).
        guidance: the classifier-free guidance weight of the conditional chain check.
        limit_tv: the total variation allowed between a chain's law under the exact
            denoiser and the data (the chain's discretisation error, :func:`check_chain_limit`).
        bound_sequences: how many clean sequences the exact per-x_0 check (g) uses.
        schedule_spread: the standard deviation of the seeded normal noise added to every
            trainable parameter of the schedule (a floating-point array that is not a
            :class:`ddiff.Constant`) whose entries all coincide, such as ``learnable_poly``'s powers, equal by default:
            a per-value schedule is then checked where it differs from its scalar special
            case, and a learnable one away from its initial value. Entries that already
            differ are kept; 0 checks the schedule as built.
        registry: the registry components are built from (default: the installed plugins).
    """

    process: Spec = dataclasses.field(default_factory=lambda: dict(DEFAULT_PROCESS))
    parameterization: Spec = dataclasses.field(default_factory=lambda: dict(DEFAULT_PARAMETERIZATION))
    vocab_size: int = 3
    seq_len: int = 4
    seed: int = 0
    num_examples: int = 2**16
    num_samples: int = 2**13
    z: float = 4.0
    alpha: float = 1e-3
    sampler_cases: tuple[str, ...] = DEFAULT_SAMPLER_CASES
    chain_cases: tuple[str, ...] = tuple(LAW_CASES)
    chain_steps: int = 8
    guidance: float = 1.5
    limit_tv: float = 0.02
    bound_sequences: int = 4
    schedule_spread: float = 0.5
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
        """The process section built, with ``schedule`` for its own when given, and the
        schedule's coinciding trainable parameters drawn (:attr:`schedule_spread`)."""
        spec = self.process if isinstance(self.process, Mapping) else {"kind": self.process}
        if schedule is not None:
            spec = {**spec, "schedule": schedule}
        process = self.build("process", spec)
        schedule = process.schedule
        drawn = _drawn_schedule(schedule, self.schedule_spread, seed=self.seed)
        if drawn is schedule:
            return process
        return eqx.tree_at(lambda p: p.schedule, process, drawn)

    def key(self, name: str) -> jax.Array:
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), zlib.crc32(name.encode()))

    def toys(self) -> dict[str, ToyDistribution]:
        return toy_distributions(self.vocab_size, self.seq_len, seed=self.seed)

    def toy(self, name: str) -> ToyDistribution:
        if name == "classes":
            return class_conditional_toy(self.vocab_size, self.seq_len, seed=self.seed)
        return self.toys()[name]

    def parameterization_built(self) -> Any:
        """The parameterization section built."""
        return self.build("parameterization", self.parameterization)

    def oracle(self, distribution: ToyDistribution, process: Any | None = None) -> DiffusionModel:
        process = self.process_with() if process is None else process
        return oracle_model(distribution, process, self.parameterization_built())

    def table(self, *, num_classes: int = 0, time_conditioned: bool = True) -> DiffusionModel:
        """The model of the exact checks (g) and (h): a random :func:`table_model`."""
        return table_model(
            self.process_with(), self.parameterization_built(), self.seq_len, seed=self.seed,
            num_classes=num_classes, time_conditioned=time_conditioned,
        )

    def bound_x0s(self) -> np.ndarray:
        """The clean sequences of the exact per-x_0 check: ``bound_sequences`` of the V^D,
        drawn once from the seed."""
        count = self.vocab_size**self.seq_len
        rng = np.random.default_rng([self.seed, 16])
        chosen = np.sort(rng.choice(count, min(self.bound_sequences, count), replace=False))
        return np.stack(np.unravel_index(chosen, (self.vocab_size,) * self.seq_len), axis=1)

    def identity(self) -> str:
        """What the exact references depend on (for caching them within a process): the
        sections, the classes they resolve to in the registry, the sizes and the seed."""
        process = self.process_with()
        parameterization = self.parameterization_built()
        classes = [
            f"{type(c).__module__}.{type(c).__qualname__}"
            for c in (process, process.schedule, parameterization)
        ]
        return json.dumps(
            [
                self.process, self.parameterization, classes, self.vocab_size, self.seq_len,
                self.seed, self.schedule_spread,
            ],
            sort_keys=True, default=str,
        )


def _drawn_schedule(schedule: AbstractSchedule, spread: float, *, seed: int) -> AbstractSchedule:
    """``schedule`` with each trainable parameter (a floating-point array that is not a
    :class:`ddiff.Constant`) whose entries all coincide moved by N(0, spread^2) noise per
    entry, drawn from ``seed``; parameters whose entries differ are kept. A learnable
    schedule starts at a special case (GenMD4's powers all 1: every value's weight
    -w_v / t the same, MD4's linear schedule), where an objective or sampler that is right
    only in the scalar case passes; drawn parameters make its state dependence count. The
    noise is added to the parameters as stored (GenMD4's phi, w = softplus(phi)); the
    result must still be a schedule, alpha in [0, 1] and non-increasing in t."""
    params, static = partition_trainable(schedule)
    rng = np.random.default_rng([seed, 17])

    def draw(leaf: jax.Array) -> jax.Array:
        values = np.asarray(leaf, np.float64)
        if spread == 0 or values.size == 0 or np.any(values != values.flat[0]):
            return leaf
        return jnp.asarray(values + spread * rng.standard_normal(values.shape), leaf.dtype)

    moved = jax.tree.map(draw, params)
    if all(a is b for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(params), strict=True)):
        return schedule
    drawn = eqx.combine(moved, static)
    alpha = np.asarray(jax.vmap(drawn.alpha)(jnp.linspace(0.0, 1.0, 65)), np.float64)
    if not (np.all(np.isfinite(alpha)) and alpha.min() >= 0.0 and alpha.max() <= 1.0
            and np.all(np.diff(alpha, axis=0) <= 1e-6)):
        raise DdiffError(
            f"the drawn trainable parameters of schedule {type(schedule).__name__} (spread "
            f"{spread:g}) give an alpha outside [0, 1] or increasing in t; set "
            f"Setup(schedule_spread=...) smaller or 0, or give the parameters distinct values"
        )
    return drawn


_REFERENCES: dict[Any, Any] = {}
"""Exact references computed in this process, by what they depend on: an objective's
mutant, or the same setup on another line, reuses them."""


def _cached(key: Any, compute: Callable[[], Any]) -> Any:
    if key not in _REFERENCES:
        _REFERENCES[key] = compute()
    return _REFERENCES[key]


def _registry(setup: Setup) -> Registry:
    return setup.registry or default_registry()


def _table_for(setup: Setup, component: Any, num_classes: int = 0) -> tuple[DiffusionModel, str]:
    """The setup's table model for ``component`` (time independent when its network must
    be), and which it is."""
    constant = TIME_INDEPENDENT in component.requires.get("network", frozenset())
    model = setup.table(num_classes=num_classes, time_conditioned=not constant)
    return model, "time-independent" if constant else "time-dependent"


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

    Every objective that declares its bound (:meth:`ddiff.AbstractObjective.bound_form`):
    ``bound_terms[table]`` (g), each reported term unbiased for its exact value per x_0
    with a random time-dependent table model. Continuous-time objectives (capability
    ``continuous_time``): ``tight[markov]``, ``tight[parity]`` (a), and for a masked process
    ``schedule_invariance`` (e) between the setup's schedule and one other. Discrete-time
    objectives (``discrete_time``, built with ``steps=T``): ``discrete_bound[parity]`` (b) at
    T in :data:`DISCRETE_STEPS`. Every objective: ``entropy_bound[mismatched]`` (c).

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

    def built_for_bounds() -> Any:
        return objective(steps=DISCRETE_STEPS[1]) if DISCRETE_TIME in provided else objective()

    def entropy() -> CheckResult:
        toy = setup.toys()["markov"]
        model = setup.oracle(setup.toys()["dense"])
        built = objective(steps=DISCRETE_STEPS[-1]) if DISCRETE_TIME in provided else objective()
        _check_pairing(setup, "objective", name, built, model)
        return check_entropy_bound(
            built, model, toy, key=setup.key("entropymismatched"),
            num_examples=max(setup.num_examples // 16, 2), z=setup.z,
            subject=f"objective {name!r} with the wrong oracle of toy 'dense' on toy 'markov'",
        )

    def terms() -> CheckResult:
        built = built_for_bounds()
        model, kind = _table_for(setup, built)
        _check_pairing(setup, "objective", name, built, model)
        form = built.bound_form()
        x0s = setup.bound_x0s()
        exact = _cached(
            ("bound", setup.identity(), form),
            lambda: exact_bound_terms(form, model, x0s),
        )
        return check_bound_terms(
            built, model, x0s, key=setup.key("terms"), num_examples=setup.num_examples,
            z=setup.z, exact=exact,
            subject=f"objective {name!r} ({form}) with a {kind} table model",
        )

    def invariance() -> CheckResult:
        toy = setup.toys()["markov"]
        wrong = setup.toys()["dense"]
        parameterization = setup.parameterization_built()

        def make_model(schedule: Any) -> DiffusionModel:
            process = eqx.tree_at(lambda p: p.schedule, setup.process_with(), schedule)
            network = oracle_network(
                wrong, process, output=oracle_output(parameterization), time_conditioned=False,
                reader=parameterization,
            )
            return DiffusionModel(network=network, parameterization=parameterization, process=process)

        return check_schedule_invariance(
            objective(), make_model, _contrasting_schedules(setup), toy, key=setup.key("invariance"),
            num_examples=setup.num_examples, z=setup.z,
            subject=f"objective {name!r} with a time-independent wrong oracle on toy 'markov'",
        )

    checks: dict[str, Callable[[], CheckResult]] = {}
    if CONTINUOUS_TIME in provided:
        checks["tight[markov]"] = tight("markov")
        checks["tight[parity]"] = tight("parity")
    if DISCRETE_TIME in provided:
        checks["discrete_bound[parity]"] = discrete("parity")
    if built_for_bounds().bound_form() is not None:
        checks["bound_terms[table]"] = terms
    checks["entropy_bound[mismatched]"] = entropy
    if CONTINUOUS_TIME in provided and _is_masked_with_schedule(setup):
        checks["schedule_invariance"] = invariance
    return checks


def _contrasting_schedules(setup: Setup) -> dict[str, Any]:
    """The setup's schedule and one registered scalar schedule of another shape (cosine,
    or linear when the setup's is cosine): MD4 sec. 4's invariance needs two shapes, not
    every registered one."""
    own = setup.process_with().schedule
    other = "linear" if type(own) is type(setup.build("schedule", "cosine")) else "cosine"
    return {"setup": own, other: setup.build("schedule", other)}


def _is_masked_with_schedule(setup: Setup) -> bool:
    process = setup.process_with()
    return MASKED in process.capabilities() and SCALAR in process.schedule.capabilities()


def _takes_steps(cls: type) -> bool:
    return any(field.name == "steps" for field in dataclasses.fields(cls))


def sampler_checks(
    name: str, setup: Setup | None = None, **sampler_arguments: Any
) -> dict[str, Callable[[], CheckResult]]:
    """The checks of the sampler registered as ``name``, by check name. Building this
    mapping does no numerical work.

    For a sampler that declares its chain (:meth:`ddiff.AbstractSampler.reverse_chain`):
    ``chain[none]`` and ``chain[labels+infill+guidance]`` (h), its samples against the
    exact law of its chain with a random time-dependent table model (with
    :attr:`Setup.chain_steps` steps), and the :attr:`Setup.sampler_cases` of
    :data:`SAMPLER_CASES` (d), the chain's exact law under the exact denoiser against
    the data (deterministic). For a sampler without a declared chain, (d) by sampling
    with the exact denoiser.

    Arguments:
        name: the registered sampler.
        setup: process, parameterization, sizes and tolerances (:class:`Setup`).
        **sampler_arguments: the sampler's own arguments (e.g. ``steps``).
    """
    setup = setup or Setup()
    cls = _registry(setup).get("sampler", name)
    spec = {"kind": name, **sampler_arguments}
    declared = setup.build("sampler", spec).reverse_chain() is not None

    def subject(toy: str, steps: Any = None) -> str:
        arguments = dict(sampler_arguments)
        if steps is not None:
            arguments["steps"] = steps
        return f"sampler {name!r} ({_arguments(arguments)}) on toy {toy!r}"

    def case(conditioning: str, toy_name: str) -> Callable[[], CheckResult]:
        def run() -> CheckResult:
            toy = setup.toy(toy_name)
            sampler = setup.build("sampler", spec)
            model = setup.oracle(toy)
            _check_pairing(setup, "sampler", name, sampler, model)
            chain = sampler.reverse_chain()
            if chain is None:
                return check_sampler(
                    sampler, model, toy, key=setup.key(f"sampler{conditioning}{toy_name}"),
                    conditioning=conditioning, num_samples=setup.num_samples, alpha=setup.alpha,
                    subject=subject(toy_name),
                )
            return _cached(
                ("limit", setup.identity(), chain, conditioning, toy_name, setup.limit_tv),
                lambda: check_chain_limit(
                    chain, model.process, toy, key=setup.key(f"patterns{toy_name}"),
                    conditioning=conditioning, tolerance=setup.limit_tv,
                    subject=subject(toy_name) + " driven by the exact denoiser",
                ),
            )

        return run

    def law(conditioning: str, toy_name: str, guidance: float | None) -> Callable[[], CheckResult]:
        def run() -> CheckResult:
            toy = setup.toy(toy_name)
            steps = setup.chain_steps if _takes_steps(cls) else None
            sampler = setup.build("sampler", spec if steps is None else {**spec, "steps": steps})
            model, kind = _table_for(setup, sampler, num_classes=toy.num_classes)
            _check_pairing(setup, "sampler", name, sampler, model)
            weight = setup.guidance if guidance is None else guidance
            return check_reverse_chain(
                sampler, model, toy, key=setup.key(f"chain{conditioning}{toy_name}"),
                conditioning=conditioning, guidance=weight, num_samples=setup.num_samples,
                alpha=setup.alpha,
                subject=subject(toy_name, steps) + f" with a {kind} table model",
            )

        return run

    unknown = sorted(set(setup.sampler_cases) - set(SAMPLER_CASES))
    unknown += sorted(set(setup.chain_cases) - set(LAW_CASES))
    if unknown:
        raise DdiffError(
            f"unknown sampler case(s) {', '.join(unknown)} in Setup.sampler_cases or "
            f"Setup.chain_cases (available: {', '.join([*SAMPLER_CASES, *LAW_CASES])})"
        )
    checks = {}
    if declared:
        checks.update({check: law(*LAW_CASES[check]) for check in setup.chain_cases})
    checks.update({check: case(*SAMPLER_CASES[check]) for check in setup.sampler_cases})
    return checks


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
