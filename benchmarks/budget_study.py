"""The budget study of docs/weighting.md: every continuous-time family, and D3PM's hybrid
loss, trained at equal steps with and without the auxiliary cross-entropy, on one of two
corpora:

- ``markov``: the quickstart's Markov source (``recipes/quickstart.yaml`` as it is: V = 16,
  D = 32, transformer width 64 x 2, batch 64), whose exact entropy is known;
- ``stdlib``: a character-level English corpus of 27 symbols (``a``..``z`` and space, as
  text8) made offline from the docstrings of the running Python's standard library
  (:func:`stdlib_corpus`), read by the ``text_file`` source (5% held out), windows of 64
  characters, batch 32 (the same 2048 tokens a step), the quickstart's network and
  optimizer.

For each run it reports the held-out bits per token (the exact bound, ``eval.json``), the
standard deviation of the per-step training loss over the last half of the run (nats per
sequence, ``metrics.jsonl`` logged every step), the median time of a logged training
step and the wall time of ``ddiff run`` (compilation and evaluation included). Run:

    nice -n 19 python benchmarks/budget_study.py --corpus markov --steps 300 --out runs/budget_study
    nice -n 19 python benchmarks/budget_study.py --corpus stdlib --steps 1500 --out runs/budget_study_stdlib

Each configuration is the corpus's base (recipe and overrides below) with the family's
process, parameterization, objective and sampler; nothing else differs.
"""

import argparse
import ast
import json
import re
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

MASKED = ("process={kind: masked, schedule: {kind: cosine}}", "parameterization={kind: mean}")
GENMD4 = (
    "process={kind: masked, schedule: {kind: learnable_poly}}",
    "parameterization={kind: mean}",
)
SCORE = ("process={kind: masked, schedule: {kind: cosine}}", "parameterization={kind: score}")
UNIFORM = ("process={kind: uniform, schedule: {kind: geometric}}", "parameterization={kind: x0}")
CAMPBELL = ("process={kind: masked, schedule: {kind: linear}}", "parameterization={kind: mean}")
D3PM = ("process={kind: masked, schedule: {kind: jsd}}", "parameterization={kind: mean}")

FAMILIES = {
    "md4_elbo": (*MASKED, "sampler={kind: ancestral, steps: 8}"),
    "md4_elbo[linear]": (*CAMPBELL, "sampler={kind: ancestral, steps: 8}"),
    "campbell_elbo": (*CAMPBELL, "sampler={kind: tau_leaping, steps: 8}"),
    "campbell_elbo_single_jump": (*CAMPBELL, "sampler={kind: tau_leaping, steps: 8}"),
    "genmd4_elbo": (*GENMD4, "sampler={kind: genmd4_ancestral, steps: 8}"),
    "score_entropy": (*SCORE, "sampler={kind: euler, steps: 8}"),
    "score_entropy[uniform]": (*UNIFORM, "sampler={kind: euler, steps: 8}"),
}
D3PM_FAMILY = (*D3PM, "sampler={kind: d3pm_ancestral, steps: 8}")


ALPHABET = "abcdefghijklmnopqrstuvwxyz "
"""The stdlib corpus's tokens, in text8's order: a..z are 0..25, space is 26."""
SKIPPED_PACKAGES = frozenset({"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages"})
"""Standard-library folders left out of the corpus: test suites, GUI code, vendored wheels."""


def _stdlib_texts():
    """The standard library's docstrings (modules, classes, functions; files in path order,
    docstrings in source order), then the ``pydoc_data`` topics in name order."""
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if SKIPPED_PACKAGES & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    yield docstring
    for name in sorted(topics):
        yield topics[name]


def stdlib_corpus(limit: int | None = None) -> str:
    """A character-level English corpus made from text every Python installation holds: the
    docstrings of the standard library (read with :mod:`ast`, nothing imported) and the
    language reference topics of ``pydoc_data``, lower-cased, each run of other characters
    made one space (text8's alphabet, without its spelled-out digits). About 1.74M characters
    on CPython 3.11; ``limit`` keeps the first ``limit`` (and reads only what they need)."""
    pieces, total = [], 0
    for text in _stdlib_texts():
        piece = re.sub(r"[^a-z]+", " ", text.lower()).strip()
        if piece:
            pieces.append(piece)
            total += len(piece) + 1
        if limit is not None and total >= limit:
            break
    return " ".join(pieces)[:limit]


def corpus_base(corpus: str, out: Path) -> tuple[str, ...]:
    """The overrides of ``recipes/quickstart.yaml`` that every run on ``corpus`` shares."""
    if corpus == "markov":
        return ()
    path = out / "stdlib_corpus.txt"
    if not path.exists():
        text = stdlib_corpus()
        partial = path.with_suffix(".partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
        print(f"wrote {path}: {len(text):,} characters", flush=True)
    return (
        f"data={{kind: text_file, path: '{path.absolute()}', alphabet: '{ALPHABET}', length: 64}}",
        "trainer.batch_size=32",
        "eval.time_draws=4",
    )


def configurations(cross_entropy: float) -> dict[str, tuple[str, ...]]:
    runs = {}
    for family, overrides in FAMILIES.items():
        kind = family.split("[")[0]
        runs[family] = (*overrides, f"objective={{kind: {kind}}}")
        weighting = f"{{kind: bound, cross_entropy: {cross_entropy}}}"
        runs[f"{family} + CE"] = (*overrides, f"objective={{kind: {kind}, weighting: {weighting}}}")
    runs["d3pm_vb"] = (*D3PM_FAMILY, "objective={kind: d3pm_vb, steps: 1000}")
    hybrid = cross_entropy / 1000
    runs["d3pm_vb + CE"] = (
        *D3PM_FAMILY,
        f"objective={{kind: d3pm_vb, steps: 1000, hybrid_weight: {hybrid}}}",
    )
    return runs


def run_one(name: str, overrides: tuple[str, ...], steps: int, workdir: Path, base: tuple[str, ...] = ()) -> dict:
    settings = (
        f"trainer.steps={steps}", "trainer.log_every=1", f"trainer.eval_every={steps}",
        f"trainer.checkpoint_every={steps}", "trainer.num_samples=0", "optimizer.warmup_steps=20",
    )  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "ddiff",
        "run",
        "recipes/quickstart.yaml",
        *base,
        *overrides,
        *settings,
    ]
    start = time.perf_counter()
    done = subprocess.run([*command, "--workdir", str(workdir)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"name": name, "error": done.stderr.strip().splitlines()[-1]}
    losses, bounds, throughput = [], [], []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split", "train") == "train" and "loss" in record:
            losses.append(record["loss"])
            bounds.append(record["nelbo"])
            if record.get("tokens_per_second"):
                throughput.append(record["tokens_per_second"])
    result = json.loads((workdir / "eval.json").read_text())
    recipe = yaml.safe_load((workdir / "recipe.yaml").read_text())
    tokens_per_step = recipe["trainer"]["batch_size"] * recipe["data"]["length"]
    tail, bound_tail = losses[len(losses) // 2 :], bounds[len(bounds) // 2 :]
    return {
        "name": name,
        "bits_per_token": result["bits_per_token"],
        "stderr": result.get("bits_per_token_stderr"),
        "entropy": result.get("entropy_bits_per_token"),
        "unigram": result.get("unigram_bits_per_token"),
        "loss_std": statistics.pstdev(tail) if len(tail) > 1 else float("nan"),
        "nelbo_std": statistics.pstdev(bound_tail) if len(bound_tail) > 1 else float("nan"),
        "ms_per_step": 1e3 * tokens_per_step / statistics.median(throughput) if throughput else None,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", choices=("markov", "stdlib"), default="markov")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cross-entropy", type=float, default=1.0)
    parser.add_argument("--only", nargs="*", help="names of configurations to run")
    parser.add_argument("--out", default="runs/budget_study")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = corpus_base(args.corpus, out)
    for name, overrides in configurations(args.cross_entropy).items():
        if args.only and name not in args.only:
            continue
        slug = name.replace(" + CE", "_ce").replace("[", "_").replace("]", "")
        result = run_one(name, overrides, args.steps, out / f"{slug}_{args.steps}", base)
        result.update(steps=args.steps, corpus=args.corpus)
        print(json.dumps(result), flush=True)
        with open(out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
