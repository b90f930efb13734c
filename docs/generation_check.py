"""Generation settings tried on models already trained: the hot-end table of docs/experiments.md.

    python docs/generation_check.py --recipe cold-end --set final_steps=250 final_noise=0.07

Takes the trained models of a recipe's runs in results/compare.json (`make compare`'s experiments, read from this
repository's DVC cache), generates from each exactly as the run's generate stage did (its own params.yaml, read
from the experiment's commit), with the `generate` values given by --set, and scores the samples as the
evaluate stage does. Without --set it reproduces the runs' own FID, confident share and coverage. No
training, no DVC experiment, no MLflow run: a way to screen generation settings on several seeds at the cost of
generation alone. Grids of the first 100 samples go to --grids if given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import data  # noqa: E402
from pipeline.buffer import uniform_noise  # noqa: E402
from pipeline.evaluate import classifier_metrics  # noqa: E402
from pipeline.experiments import cached_outputs, params_at  # noqa: E402
from pipeline.figures import save_grid  # noqa: E402
from pipeline.generate import generate_samples  # noqa: E402
from pipeline.model import IMAGE_SHAPE  # noqa: E402
from pipeline.stages.common import load_classifier, load_energy_model, load_snapshots  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="generate.KEY values")
    parser.add_argument("--grids", type=Path, help="folder for a 100-sample grid per seed")
    parser.add_argument("--seeds", nargs="*", type=int, help="only the runs of these seeds (default: all)")
    args = parser.parse_args()
    changes = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    device = torch.device("cpu")
    test, train = data.load_split("data/prepared/test.pt"), data.load_split("data/prepared/train.pt")
    runs = [r for r in json.loads(Path("results/compare.json").read_text()) if r["recipe"] == args.recipe]
    runs = [r for r in runs if args.seeds is None or r["seed"] in args.seeds]
    print(f"generate: {changes or 'as each run'}; runs of {args.recipe}: FID / confident / coverage, then the run's own")
    for run in runs:
        params = params_at(Path("."), run["rev"])
        files = cached_outputs(Path("."), run["rev"], "models/ebm.pt", "models/classifier.pt")
        if files is None:
            print(f"seed {run['seed']}: trained model not in this DVC cache")
            continue
        model_file, classifier_file = files
        model, blob = load_energy_model(model_file, device)
        cfg = dataclasses.replace(params.generate, seed=run["seed"], **changes)
        cfg.validate("generate")
        nets = load_snapshots(model, blob, cfg.snapshots, model_file)  # generate.snapshots: the run's, or --set
        samples, _ = generate_samples(nets, cfg, params.langevin, device, progress=False)
        generator = torch.Generator().manual_seed(params.evaluate.seed)  # the evaluate stage's draws, in its order
        uniform_noise(params.evaluate.n_noise, IMAGE_SHAPE, device="cpu", generator=generator)
        m, per_digit = classifier_metrics(
            load_classifier(classifier_file, device), samples, test.images, train.images, device,
            params.evaluate.confidence, generator,
        )
        if args.grids:
            args.grids.mkdir(parents=True, exist_ok=True)
            save_grid(samples[:100], args.grids / f"{args.recipe}-seed{run['seed']}.png", title=f"seed {run['seed']}")
        print(
            f"seed {run['seed']}: {m['fid']:.1f} / {m['confident_share']:.3f} / {m['coverage_entropy']:.3f}   "
            f"(run: {run['fid']:.1f} / {run['confident_share']:.3f} / {run['coverage_entropy']:.3f})   "
            f"mix: real {m['fid_real_mix']:.1f}, even {m['fid_even_mix']:.1f}   per digit {per_digit.tolist()}"
        )


if __name__ == "__main__":
    main()
