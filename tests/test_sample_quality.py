"""Sample-quality measures on cases with known answers, and their commands: ``ddiff eval
--samples --judge`` and ``ddiff quality`` on the tiny quickstart run with a tiny
autoregressive judge."""

import json
import math

import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from ddiff_plugins.synthetic import MarkovChainSource, ToySource

from ddiff.runner import main, quality

AR_TINY = (
    *(o for o in TINY_OVERRIDES if not o.startswith(("sampler.", "eval.time_draws", "trainer.num_samples"))),
    "trainer.steps=2",
    "trainer.log_every=1",
    "trainer.num_samples=0",
    "trainer.final_eval=false",
)
"""The tests' tiny recipe for recipes/ar_quickstart.yaml (its sampler has no steps), 2 steps."""


def test_entropy_and_ngram_distance_closed_forms():
    assert quality.unigram_entropy_bits(np.asarray([[0, 1, 2, 3], [3, 2, 1, 0]])) == pytest.approx(2.0)
    first, second = np.asarray([[0, 0, 0]]), np.asarray([[0, 1, 0]])
    assert quality.ngram_tv(first, second, 1) == pytest.approx(1 / 3)
    assert quality.ngram_tv(first, second, 2) == pytest.approx(1.0)
    assert quality.ngram_tv(second, second, 2) == 0.0


@pytest.fixture(scope="module")
def source():
    return MarkovChainSource(num_symbols=8, length=16, concentration=0.2, num_train=4096, num_eval=2048)


def test_samples_from_the_source_score_its_entropy(source):
    """4096 sequences drawn from the chain (its train split): their exact NLL per token is
    the entropy within 4 standard errors, their unigram and n-gram statistics are those of
    the data within the data's own spread, and they are not flagged."""
    samples = np.asarray(source.split("train").tokens)
    reference = quality.reference_tokens(source, 2 * len(samples))
    result = quality.sample_quality(samples, source, reference)
    entropy = source.reference_stats()["entropy_bits_per_token"]
    assert abs(result["nll_bits_per_token"] - entropy) <= 4 * result["nll_bits_per_token_stderr"], result
    assert result["entropy_bits_per_token"] == entropy and not result["entropy_collapse"]
    assert abs(result["unigram_entropy_bits"] - result["data_unigram_entropy_bits"]) < 0.02
    for n in quality.NGRAM_ORDERS:
        assert result[f"ngram_tv_{n}"] < 2 * result[f"data_ngram_tv_{n}"] + 0.01, result


def test_collapsed_and_noisy_samplers_are_told_apart(source):
    """Every sample the chain's most likely sequence (greedy decoding taken to the limit):
    too likely, low unigram entropy, flagged. Uniform tokens: far less likely than the
    source's samples, high entropy, not a collapse."""
    reference = quality.reference_tokens(source, 1024)
    transition, stationary = source.chain
    mode = [int(np.argmax(stationary))]
    for _ in range(source.length - 1):
        mode.append(int(np.argmax(transition[mode[-1]])))
    collapsed = quality.sample_quality(np.tile(mode, (512, 1)), source, reference)
    assert collapsed["entropy_collapse"] and collapsed["distinct_fraction"] == 1 / 512
    assert collapsed["nll_bits_per_token"] < source.reference_stats()["entropy_bits_per_token"]
    noisy = np.random.default_rng(0).integers(0, source.num_symbols, (512, source.length))
    result = quality.sample_quality(noisy, source, reference)
    assert not result["entropy_collapse"]
    assert result["nll_bits_per_token"] > source.reference_stats()["entropy_bits_per_token"] + 1.0
    assert result["ngram_tv_2"] > 3 * result["data_ngram_tv_2"]


def test_toy_source_knows_its_conditional_log_probabilities():
    source = ToySource(toy="classes", num_train=64, num_eval=16)
    split = source.split("eval")
    tokens, labels = np.asarray(split.tokens), np.asarray(split.labels)
    distribution = source.distribution
    table = np.asarray(distribution.log_probs, np.float64)  # log p(x | c), enumeration order
    index = tokens @ (source.num_symbols ** np.arange(source.length - 1, -1, -1))
    np.testing.assert_allclose(source.log_prob(tokens, labels), table[labels, index], atol=1e-6)
    class_weights = np.exp(np.asarray(distribution.class_log_probs, np.float64))
    marginal = np.log(class_weights @ np.exp(table))[index]
    np.testing.assert_allclose(source.log_prob(tokens), marginal, atol=1e-5)


def test_eval_samples_with_a_judge_and_quality_against_cost(full_run, tmp_path, capsys):
    workdir, _ = full_run
    judge = tmp_path / "judge"
    assert main(["run", "recipes/ar_quickstart.yaml", *AR_TINY, "--workdir", str(judge)]) == 0
    capsys.readouterr()

    assert main(["eval", str(workdir), "--judge", str(judge)]) == 2
    assert "--judge needs samples" in capsys.readouterr().err

    assert main(["eval", str(workdir), "--samples", "8", "--judge", str(judge), "--output", "sampled.json"]) == 0
    capsys.readouterr()
    samples = json.loads((workdir / "sampled.json").read_text())["samples"]
    assert samples["num_samples"] == 8 and samples["num_function_evals"] in (4, 5)  # 4 steps (+ decoding)
    assert samples["judge"] == str(judge) and math.isfinite(samples["judge_perplexity"])
    bits = samples["judge_bits_per_token"]
    assert samples["judge_perplexity"] == pytest.approx(2.0**bits) and bits > 0
    assert math.isfinite(samples["nll_bits_per_token"]) and "entropy_bits_per_token" in samples

    arguments = ["quality", str(workdir), "--sampler", "{kind: confidence, schedule: linear}", "--steps", "2,8"]
    assert main([*arguments, "--num", "8"]) == 0
    out = capsys.readouterr().out
    table = json.loads((workdir / "quality.json").read_text())
    assert [row["num_function_evals"] for row in table["rows"]] == [2, 8]
    assert [row["given"]["steps"] for row in table["rows"]] == [2, 8]
    assert "confidence(schedule=linear, steps=8)" in out and (workdir / "quality.png").stat().st_size > 0
    assert main(["quality", str(workdir), "--sampler", "left_to_right", "--num", "8"]) == 2
    assert "left_to_right" in capsys.readouterr().err
    written = (workdir / "quality.json").read_bytes()
    # The trained network is time conditioned: cached is refused before ancestral runs.
    assert main(["quality", str(workdir), "--sampler", "ancestral", "--sampler", "cached", "--num", "8"]) == 2
    captured = capsys.readouterr()
    assert "time_independent" in captured.err and "ancestral" not in captured.out
    assert (workdir / "quality.json").read_bytes() == written
