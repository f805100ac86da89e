"""The budget study's corpora and configurations (benchmarks/budget_study.py, reported in
docs/weighting.md): the character corpus is made offline, in text8's alphabet, the same on
every call, and every configuration of the study loads as a recipe on both corpora."""

import importlib.util
from pathlib import Path

import pytest

from ddiff.runner import load_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("budget_study", ROOT / "benchmarks" / "budget_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stdlib_corpus_is_text8_alphabet_and_reproducible(study):
    text = study.stdlib_corpus(limit=20_000)
    assert len(text) == 20_000
    assert set(text) == set(study.ALPHABET)
    assert "  " not in text and not text.startswith(" ")
    assert study.stdlib_corpus(limit=5_000) == text[:5_000]
    words = text.split()
    assert sum(word in {"the", "of", "a", "is", "to"} for word in words) > len(words) / 20  # English


@pytest.mark.parametrize("corpus", ["markov", "stdlib"])
def test_every_configuration_of_the_study_loads(study, corpus, tmp_path):
    (tmp_path / "stdlib_corpus.txt").write_text(study.stdlib_corpus(limit=20_000))
    base = study.corpus_base(corpus, tmp_path)
    for name, overrides in study.configurations(1.0).items():
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", (*base, *overrides))
        assert recipe.names["objective"] == name.split("[")[0].split(" ")[0], name
        if corpus == "stdlib":
            assert recipe.trainer.batch_size == 32 and recipe.resolved["data"]["length"] == 64
            assert recipe.resolved["data"]["alphabet"] == study.ALPHABET
