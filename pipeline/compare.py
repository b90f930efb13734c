"""Recipes side by side: each recipe x seed is one DVC experiment (and one MLflow run), then a table.

``python -m pipeline compare --recipes default book --seeds 0 1 2`` runs, for every pair,
``dvc exp run --temp --name <recipe>-seed<k> -S ...`` with the recipe's params (``default`` is
params.yaml as it is; any other name is ``presets/<name>.yaml``, a partial params file) and
``train.seed = generate.seed = k``. The workspace's params.yaml and outputs are not touched; each
experiment is listed by ``dvc exp show`` and is an MLflow run named after it, so the runs can be
compared in the MLflow UI. It then writes, under ``--out`` (default ``results/``):

- ``compare.json``: one row per run (metrics, training time, MLflow run id, experiment commit);
- ``compare.md``: the table recipe x seed -> FID, confidence, coverage, training time, with
  per-recipe means and the real-versus-real FID floor;
- ``samples-<recipe>-seed<k>.png`` (the run's sample grid) and ``compare.png`` (seed 0 of each
  recipe side by side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline import experiments
from pipeline.config import ConfigError, Params, load_params
from pipeline.experiments import check_overrides, command_env, exp_run_args, experiment_copy_paths, parse_set

PRESETS_DIR = "presets"
DEFAULT = "default"
COLUMNS = (  # (metrics file, key, column title, format)
    ("evaluate.json", "fid", "FID ↓", "{:.1f}"),
    ("evaluate.json", "confident_share", "confident ↑", "{:.3f}"),
    ("evaluate.json", "coverage_entropy", "coverage ↑", "{:.3f}"),
    ("train.json", "train_seconds", "train s", "{:.0f}"),
    ("train.json", "steps", "train steps", "{:.0f}"),
)


class CompareError(RuntimeError):
    """A recipe cannot be read or an experiment failed."""


def flatten(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_overrides(repo: Path, name: str) -> dict[str, Any]:
    """``{"section.key": value}`` of a recipe: nothing for ``default``, else ``presets/<name>.yaml``."""
    if name == DEFAULT:
        return {}
    path = repo / PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (repo / PRESETS_DIR).glob("*.yaml"))
        raise CompareError(f"compare: no recipe {name!r}: {path} not found (known: {', '.join([DEFAULT, *known])})")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise CompareError(f"compare: {path} must map params sections to values")
    return flatten(raw)


def plan(
    repo: Path, params: Params, recipes: list[str], seeds: list[int], extra: dict[str, Any] | None = None
) -> list[tuple[str, int, list[str]]]:
    """(recipe, seed, ``-S`` arguments) for every run, each validated against the config first.

    ``extra`` overrides (``--set``) apply to every recipe, after the recipe's own values.
    """
    runs = []
    for recipe in recipes:
        base = recipe_overrides(repo, recipe)
        for seed in seeds:
            overrides = {**base, **(extra or {}), "train.seed": seed, "generate.seed": seed}
            try:
                _, set_args = check_overrides(params, overrides)
            except ConfigError as exc:
                raise CompareError(f"compare: recipe {recipe!r}: {exc}") from None
            runs.append((recipe, seed, set_args))
    return runs


def run_experiment(repo: Path, params: Params, name: str, set_args: list[str]) -> None:
    """``dvc exp run --temp`` for one recipe and seed, its output shown as it runs."""
    subprocess.run(  # an earlier experiment of this name on this commit is replaced
        [sys.executable, "-m", "dvc", "exp", "remove", name],
        cwd=repo, env=command_env(), capture_output=True, check=False,
    )
    args = [sys.executable, "-m", "dvc", *exp_run_args(name, set_args, experiment_copy_paths(repo, params))]
    with experiments.git_index_kept(repo, lambda line: print(f"compare: {line}", file=sys.stderr)):
        code = subprocess.run(args, cwd=repo, env=command_env(), check=False).returncode
    if code != 0:
        raise CompareError(f"compare: experiment {name} failed (dvc exp run {' '.join(set_args)})")


def experiment_rev(repo: Path, name: str) -> str:
    """The commit of experiment ``name`` run from the current HEAD."""
    rev = experiments.experiment_rev(repo, name)
    if rev is None:
        raise CompareError(f"compare: no experiment {name} from this commit (no refs/exps/../{name} for HEAD)")
    return rev


def collect(repo: Path, params: Params, recipe: str, seed: int, name: str, out: Path) -> dict[str, Any]:
    """The experiment's metrics, MLflow run id and commit, read from its commit; its sample grid copied to ``out``.

    Read by the experiment's ref (``experiments.experiment_rev``).
    """
    rev = experiment_rev(repo, name)
    metrics_dir = Path(params.paths.metrics_dir).as_posix()
    files = {file: experiments.json_at(repo, rev, f"{metrics_dir}/{file}") for file in {c[0] for c in COLUMNS}}
    values: dict[str, Any] = {key: files[file].get(key) for file, key, *_ in COLUMNS}
    values["fid_real_floor"] = files["evaluate.json"].get("fid_real_floor")
    run_id = experiments.json_at(repo, rev, Path(params.paths.run_info).as_posix()).get("run_id")
    grid = experiments.git(repo, "show", f"{rev}:{Path(params.paths.samples_dir, 'samples.png').as_posix()}")
    image = None
    if grid.returncode == 0:
        image = out / f"samples-{name}.png"
        image.write_bytes(grid.stdout)
    return {
        "recipe": recipe, "seed": seed, "experiment": name, "rev": rev, "mlflow_run_id": run_id,
        "samples": image.name if image else None, **values, **run_hardware(run_id),
    }


def run_hardware(run_id: str | None) -> dict[str, str]:
    """What the run's sampler ran in and on, from its MLflow tags: ``precision`` and ``cpu`` (model and ISA,
    or the GPU). Empty where the store or the run cannot be read (a row of another machine's store)."""
    if not run_id:
        return {}
    try:
        from pipeline import tracking

        tags = tracking.store_client().get_run(run_id).data.tags
    except Exception:  # noqa: BLE001 - the table is still useful without these two cells
        return {}
    out = {}
    if tags.get("precision"):
        out["precision"] = tags["precision"]
    if tags.get("hardware.cpu_model"):
        out["cpu"] = f"{tags['hardware.cpu_model']} ({tags.get('hardware.cpu_isa', '?')})"
    elif tags.get("hardware.device"):
        out["cpu"] = tags["hardware.device"]
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown(rows: list[dict[str, Any]]) -> str:
    """recipe x seed table, then mean ± sd per recipe, then the FID floor."""
    head = ["recipe", "seed", *[c[2] for c in COLUMNS], "sampler", "CPU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["recipe"], str(r["seed"])]
        cells += ["–" if r.get(key) is None else fmt.format(r[key]) for _, key, _, fmt in COLUMNS]
        cells += [r.get("precision") or "–", r.get("cpu") or "–"]
        lines.append("| " + " | ".join(cells) + " |")
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    lines += ["", "| recipe (mean ± sd over seeds) | runs | " + " | ".join(c[2] for c in COLUMNS) + " |"]
    lines.append("|" + "---|" * (len(COLUMNS) + 2))
    for recipe in recipes:
        mine = [r for r in rows if r["recipe"] == recipe]
        cells = [recipe, str(len(mine))]
        for _, key, _, fmt in COLUMNS:
            vals = [float(r[key]) for r in mine if r.get(key) is not None]
            if not vals:
                cells.append("–")
                continue
            mean, sd = _mean_sd(vals)
            cells.append(f"{fmt.format(mean)} ± {fmt.format(sd)}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += paired(rows, recipes)
    floors = [float(r["fid_real_floor"]) for r in rows if r.get("fid_real_floor") is not None]
    if floors:
        lines += ["", f"Real-versus-real FID floor (train subset vs test, same N): {statistics.fmean(floors):.1f}."]
    return "\n".join(lines) + "\n"


def paired(rows: list[dict[str, Any]], recipes: list[str]) -> list[str]:
    """Each later recipe against the first, seed by seed: the mean difference ± its standard error, and
    on how many seeds the first is better (by the column's arrow). Lines of a markdown table, or none."""
    if len(recipes) < 2:
        return []
    base = recipes[0]
    scored = [c for c in COLUMNS if c[2].endswith(("↓", "↑"))]
    out = ["", f"| seed by seed: {base} − recipe | seeds | " + " | ".join(c[2] for c in scored) + " |",
           "|" + "---|" * (len(scored) + 2)]
    base_rows = {r["seed"]: r for r in rows if r["recipe"] == base}
    for recipe in recipes[1:]:
        pairs = [(base_rows[r["seed"]], r) for r in rows if r["recipe"] == recipe and r["seed"] in base_rows]
        # Runs from different CPU kinds or sampler precisions differ in more than the recipe: say so on the row.
        mixed = any(mine.get(k) and other.get(k) and mine[k] != other[k]
                    for mine, other in pairs for k in ("cpu", "precision"))
        cells = [f"{base} − {recipe}" + (" (rows differ in CPU or sampler precision)" if mixed else ""), ""]
        seeds_used: set[int] = set()
        for _, key, title, fmt in scored:
            diffs = []
            for mine, other in pairs:
                if mine.get(key) is not None and other.get(key) is not None:
                    diffs.append(float(mine[key]) - float(other[key]))
                    seeds_used.add(other["seed"])
            if not diffs:
                cells.append("–")
                continue
            mean, sd = _mean_sd(diffs)
            se = sd / len(diffs) ** 0.5
            better = sum(d < 0 if title.endswith("↓") else d > 0 for d in diffs)
            cells.append(f"{fmt.format(mean)} ± {fmt.format(se)} ({better}/{len(diffs)} better)")
        cells[1] = str(len(seeds_used))
        out.append("| " + " | ".join(cells) + " |")
    out.append(f"(mean ± standard error of the differences over the seeds both recipes ran; "
               f"\"better\": seeds on which {base} is better)")
    return out


def figure(rows: list[dict[str, Any]], out: Path, path: Path) -> None:
    """The sample grid of each recipe's first seed, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    firsts: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r.get("samples") and r["recipe"] not in firsts:
            firsts[r["recipe"]] = r
    if not firsts:
        return
    fig, axes = plt.subplots(1, len(firsts), figsize=(5.2 * len(firsts), 6.0), squeeze=False)
    for ax, (recipe, r) in zip(axes[0], firsts.items()):
        ax.imshow(plt.imread(out / r["samples"]))
        fid = "–" if r.get("fid") is None else f"{r['fid']:.1f}"
        ax.set_title(f"{recipe} (seed {r['seed']}): FID {fid}", pad=10)
        ax.axis("off")
    fig.tight_layout(pad=1.5)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def read_rows(out: Path) -> list[dict[str, Any]]:
    path = out / "compare.json"
    if not path.is_file():
        return []
    try:
        rows = json.loads(path.read_text())
    except ValueError:
        raise CompareError(f"compare: {path} is not valid JSON; remove it or pass --fresh") from None
    return [r for r in rows if isinstance(r, dict) and "recipe" in r and "seed" in r]


def merge(rows: list[dict[str, Any]], row: dict[str, Any]) -> list[dict[str, Any]]:
    """``rows`` with ``row`` in place of the row of the same recipe and seed, ordered by recipe, then seed."""
    kept = [r for r in rows if (r["recipe"], r["seed"]) != (row["recipe"], row["seed"])] + [row]
    order = list(dict.fromkeys(r["recipe"] for r in [*rows, row]))
    return sorted(kept, key=lambda r: (order.index(r["recipe"]), r["seed"]))


def write_results(rows: list[dict[str, Any]], out: Path) -> None:
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "compare.md").write_text(markdown(rows))
    figure(rows, out, out / "compare.png")


def main(argv: list[str] | None = None, params_path: str = "params.yaml") -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline compare", description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=[DEFAULT, "book"], help="default and/or presets/<name>.yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default="results", help="folder for the table, the JSON and the figures")
    parser.add_argument("--fresh", action="store_true", help="start a new table instead of updating --out's")
    parser.add_argument(
        "--collect-only", action="store_true",
        help="run nothing: tabulate the experiments of these recipes and seeds already run from this commit",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="a param for every run, over the recipe's (e.g. data.source=mnist); repeatable",
    )
    args = parser.parse_args(argv)
    repo = Path.cwd()
    try:
        params = load_params(params_path)
        runs = plan(repo, params, args.recipes, args.seeds, parse_set(args.set))  # every recipe checked before anything runs
        out = repo / args.out
        out.mkdir(parents=True, exist_ok=True)
        # Rows of other recipes and seeds already in the table stay: one recipe can be re-run alone.
        rows = [] if args.fresh else read_rows(out)
        for i, (recipe, seed, set_args) in enumerate(runs, 1):
            name = f"{recipe}-seed{seed}"
            what = "collecting" if args.collect_only else f"dvc exp run --temp {' '.join(set_args)}"
            print(f"compare: [{i}/{len(runs)}] {name}: {what}", flush=True)
            start = time.perf_counter()
            if not args.collect_only:
                run_experiment(repo, params, name, set_args)
            rows = merge(rows, collect(repo, params, recipe, seed, name, out))
            write_results(rows, out)  # a partial table survives a later failure
            print(f"compare: {name} done in {time.perf_counter() - start:.0f}s", flush=True)
    except (CompareError, ConfigError) as exc:
        print(exc, file=sys.stderr)
        return 1 if isinstance(exc, CompareError) else 2
    print(markdown(rows), end="")
    print(f"compare: results in {out}")
    return 0
