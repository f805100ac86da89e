"""The conformance kit's power and false-alarm rates at its default sizes, measured.

Objectives: a copy of a built-in objective whose bound is off by delta nats at every
x_0 (added to its diffusion term), run through the exact per-x_0 check (g) with
``--seeds`` independent seeds per delta; the smallest delta detected in 95% of them, and
the share of seeds in which the correct objective fails (false alarms).

Samplers: the counts of the chain check (h) drawn from the exact law of the chain mixed
with a deviation: with probability eps the output is replaced by a uniform sequence
that agrees with the given positions (spread: the hardest kind per unit of total
variation) or by the chain's most probable sequence (concentrated); the chi-square test of the kit on ``--draws`` such count
vectors per eps gives the detection rate, and at eps = 0 the false-alarm rate. One
end-to-end run with a sampler that really mixes confirms the simulation.

    python benchmarks/conformance_power.py [--seeds 40] [--draws 2000]

Prints a markdown table (docs/conformance.md, "The kit's power").
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import ddiff
import ddiff.testing as kit

LIGHT = {"num_examples": 2**14, "num_samples": 2**12}


class Biased(ddiff.AbstractObjective):
    """A built-in objective whose diffusion term (and bound) is off by ``delta`` nats."""

    inner: ddiff.AbstractObjective
    delta: jax.Array

    def capabilities(self):
        return self.inner.capabilities()

    def bound_form(self):
        return self.inner.bound_form()

    def sample_times(self, key, batch_size):
        return self.inner.sample_times(key, batch_size)

    def example_terms(self, model, x0, t, *, key, label=None, train=True):
        terms = self.inner.example_terms(model, x0, t, key=key, label=label, train=train)
        metrics = {**terms.metrics, "diffusion": terms.metrics["diffusion"] + self.delta}
        return ddiff.ObjectiveTerms(loss=terms.loss + self.delta, nelbo=terms.nelbo + self.delta, metrics=metrics)


OBJECTIVE_LINES = [
    ("md4_elbo", kit.Setup(), {}),
    ("md4_discrete_elbo", kit.Setup(), {}),
    ("genmd4_elbo", kit.Setup(**LIGHT, process={"kind": "masked", "schedule": {"kind": "learnable_poly", "initial_powers": [0.7, 1.5, 3.0]}}), {}),
    ("d3pm_vb", kit.Setup(**LIGHT, process={"kind": "uniform", "schedule": "d3pm_cosine"}, parameterization="x0"), {}),
    ("score_entropy", kit.Setup(**LIGHT, process={"kind": "masked", "schedule": "loglinear"}), {}),
    ("score_entropy", kit.Setup(**LIGHT, process={"kind": "uniform", "schedule": "geometric"}, parameterization="score"), {}),
    ("campbell_elbo", kit.Setup(**LIGHT), {}),
]  # fmt: skip


def objective_power(seeds: int) -> list[str]:
    rows = []
    for name, setup, arguments in OBJECTIVE_LINES:
        start = time.time()
        built = setup.build("objective", {"kind": name, **arguments, **({"steps": 4} if name in ("md4_discrete_elbo", "d3pm_vb") else {})})
        errors, alarms = [], 0
        results = {}
        for seed in range(seeds):
            line = dataclasses.replace(setup, seed=1000 + seed)
            model = line.table()
            x0s = line.bound_x0s()
            exact = kit.exact_bound_terms(built.bound_form(), model, x0s)
            key = line.key("terms")
            result = kit.check_bound_terms(built, model, x0s, key=key, num_examples=line.num_examples, exact=exact)
            alarms += not result.passed
            errors.append(result.numbers)
            results[seed] = (model, x0s, exact, key, line)
        # The pooled standard error of the bound at the seeds' models; the smallest
        # bias detected in 95% of the seeds is searched on a grid of its multiples.
        pooled = np.asarray([
            np.sqrt(np.mean([n[f"nelbo_se_{k}"] ** 2 for k in range(setup.bound_sequences)]) / setup.bound_sequences)
            for n in errors
        ])
        found = None
        for multiple in (5.0, 5.5, 6.0, 7.0, 8.0):
            delta = float(multiple * np.median(pooled))
            detected = 0
            for seed in range(seeds):
                model, x0s, exact, key, line = results[seed]
                biased = Biased(built, jnp.asarray(delta, jnp.float32))
                result = kit.check_bound_terms(biased, model, x0s, key=key, num_examples=line.num_examples, exact=exact)
                detected += not result.passed
            if detected >= 0.95 * seeds:
                found = (delta, detected)
                break
        found_text = f"{found[0]:.3f} ({found[1]}/{seeds})" if found else "> 8 se"
        rows.append(
            f"| `{name}` ({_process(setup)}, {setup.num_examples} draws) | {np.median(pooled):.3f} | "
            f"{found_text} | {alarms}/{seeds} | {time.time() - start:.0f} s |"
        )
        print(rows[-1], flush=True)
    return rows


def _process(setup) -> str:
    process = setup.process
    schedule = process["schedule"] if isinstance(process["schedule"], str) else process["schedule"]["kind"]
    return f"{process['kind']} {schedule}, {setup.parameterization if isinstance(setup.parameterization, str) else setup.parameterization['kind']}"


SAMPLER_LINES = [
    ("ancestral", kit.Setup(), {"steps": 128}, "chain[none]"),
    ("ancestral", kit.Setup(), {"steps": 128}, "chain[labels+infill+guidance]"),
    ("first_hitting", kit.Setup(process={"kind": "masked", "schedule": "cosine"}), {}, "chain[none]"),
    ("euler", kit.Setup(**LIGHT, process={"kind": "uniform", "schedule": "geometric"}, parameterization="x0"), {"steps": 128}, "chain[none]"),
    ("tau_leaping", kit.Setup(**LIGHT), {"steps": 128}, "chain[none]"),
]  # fmt: skip


def sampler_power(draws: int) -> list[str]:
    rows = []
    for name, setup, arguments, case in SAMPLER_LINES:
        conditioning, toy_name, guidance = kit.LAW_CASES[case]
        toy = setup.toy(toy_name)
        steps = setup.chain_steps if "steps" in arguments else None
        sampler = setup.build("sampler", {"kind": name, **arguments, **({"steps": steps} if steps else {})})
        model = setup.table(num_classes=toy.num_classes)
        spec, combos, combo = kit.conditioning_patterns(
            toy, conditioning, key=setup.key(f"chain{conditioning}{toy_name}"), num_samples=setup.num_samples,
            guidance=setup.guidance if guidance is None else guidance,
        )
        law, _ = kit.chain_law(sampler.reverse_chain(), model.process, kit.model_predictions(model),
                               seq_len=setup.seq_len, combos=combos, guidance=spec.guidance)
        per_combo = np.bincount(combo, minlength=combos.count)
        rng = np.random.default_rng(0)
        cells = law.shape[1]
        results = []
        # The deviations keep the given positions (a sampler that changed them would be
        # caught outright): uniform over the sequences that agree with them, or all on the
        # chain's most probable sequence.
        sequences = np.asarray(toy.sequences())
        agree = np.all((sequences[None] == combos.fixed_tokens[:, None]) | ~combos.fixed_mask[:, None], axis=2)
        for kind in ("spread", "concentrated"):
            if kind == "spread":
                other = agree / agree.sum(1, keepdims=True)
            else:
                other = np.eye(cells)[np.argmax(law, axis=1)]
            found, alarms = None, 0
            for eps in (0.0, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4):
                mixed = (1 - eps) * law + eps * other
                detected = 0
                for _ in range(draws):
                    counts = np.stack([rng.multinomial(n, p) for n, p in zip(per_combo, mixed, strict=True)])
                    test = kit.chi_square_test(counts, law * (per_combo[:, None] / setup.num_samples),
                                               constraints=int((per_combo > 0).sum()))
                    detected += test["p_value"] < setup.alpha or test["impossible"] > 0
                if eps == 0.0:
                    alarms = detected
                    continue
                if detected >= 0.95 * draws:
                    weights = per_combo / per_combo.sum()
                    tv = float(weights @ (0.5 * np.abs(mixed - law).sum(1)))
                    found = (eps, tv)
                    break
            results.append((kind, found, alarms))
        text = "; ".join(
            f"{kind}: TV {found[1]:.3f} (eps {found[0]:g})" if found else f"{kind}: > eps 0.4"
            for kind, found, _ in results
        )
        rows.append(
            f"| `{name}` {case} ({setup.num_samples} samples) | {text} | {results[0][2]}/{draws} |"
        )
        print(rows[-1], flush=True)
    return rows


class Mixing(ddiff.AbstractSampler):
    """A built-in sampler that replaces each output by a uniform sequence with probability eps."""

    inner: ddiff.AbstractSampler
    eps: float

    def reverse_chain(self):
        return self.inner.reverse_chain()

    def sample(self, model, *, keys, seq_len, conditioning):
        output = self.inner.sample(model, keys=keys, seq_len=seq_len, conditioning=conditioning)
        extra = ddiff.step_keys(keys, 10**6)
        swap = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 0), self.eps, (1,)))(extra)
        noise = jax.vmap(
            lambda k: jax.random.randint(jax.random.fold_in(k, 1), (seq_len,), 0, model.process.vocab_size)
        )(extra)
        return ddiff.SampleOutput(tokens=jnp.where(swap, noise, output.tokens), num_function_evals=output.num_function_evals)


def end_to_end(eps: float, seeds: int) -> str:
    setup = kit.Setup()
    toy = setup.toy("markov")
    sampler = Mixing(setup.build("sampler", {"kind": "ancestral", "steps": setup.chain_steps}), eps)
    detected = 0
    for seed in range(seeds):
        line = dataclasses.replace(setup, seed=2000 + seed)
        result = kit.check_reverse_chain(sampler, line.table(), toy, key=line.key("e2e"), num_samples=line.num_samples)
        detected += not result.passed
    return f"end to end, ancestral mixed with uniform sequences at eps = {eps}: detected {detected}/{seeds}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--end-to-end-eps", type=float, default=None)
    parser.add_argument("--only", choices=("objectives", "samplers"), default=None)
    args = parser.parse_args()
    if args.only != "samplers":
        print("| objective line | pooled se of the bound (nats) | smallest bias detected in 95% (nats) | false alarms | time |")
        print("|---|---|---|---|---|")
        objective_power(args.seeds)
    if args.only != "objectives":
        print("| sampler check | smallest TV detected in 95% | false alarms (eps = 0) |")
        print("|---|---|---|")
        sampler_power(args.draws)
    if args.end_to_end_eps is not None:
        print(end_to_end(args.end_to_end_eps, args.seeds))


if __name__ == "__main__":
    main()
