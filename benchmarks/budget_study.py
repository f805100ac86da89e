"""The budget study of docs/weighting.md: every continuous-time family, and D3PM's hybrid
loss, trained on the quickstart's Markov source at equal steps, with and without the
auxiliary cross-entropy. For each run it reports the held-out bits per token (the exact
bound, ``eval.json``), the standard deviation of the per-step training loss over the
last half of the run (nats per sequence, ``metrics.jsonl`` logged every step) and the
wall time of ``ddiff run`` (compilation included). Run:

    nice -n 19 python benchmarks/budget_study.py --steps 300 --out runs/budget_study

Each configuration is ``recipes/quickstart.yaml`` with the overrides below; nothing else
differs (network, optimizer, batch 64, data).
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

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


def run_one(name: str, overrides: tuple[str, ...], steps: int, workdir: Path) -> dict:
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
        *overrides,
        *settings,
    ]
    start = time.perf_counter()
    done = subprocess.run([*command, "--workdir", str(workdir)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        return {"name": name, "error": done.stderr.strip().splitlines()[-1]}
    losses = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split", "train") == "train" and "loss" in record:
            losses.append(record["loss"])
    result = json.loads((workdir / "eval.json").read_text())
    tail = losses[len(losses) // 2 :]
    return {
        "name": name,
        "bits_per_token": result["bits_per_token"],
        "stderr": result.get("bits_per_token_stderr"),
        "entropy": result.get("entropy_bits_per_token"),
        "unigram": result.get("unigram_bits_per_token"),
        "loss_std": statistics.pstdev(tail) if len(tail) > 1 else float("nan"),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cross-entropy", type=float, default=1.0)
    parser.add_argument("--only", nargs="*", help="names of configurations to run")
    parser.add_argument("--out", default="runs/budget_study")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, overrides in configurations(args.cross_entropy).items():
        if args.only and name not in args.only:
            continue
        slug = name.replace(" + CE", "_ce").replace("[", "_").replace("]", "")
        result = run_one(name, overrides, args.steps, out / f"{slug}_{args.steps}")
        result["steps"] = args.steps
        print(json.dumps(result), flush=True)
        with open(out / "results.jsonl", "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
