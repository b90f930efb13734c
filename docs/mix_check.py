"""How much of the FID is the mix of digits: the table of docs/experiments.md, "The mix of digits".

    python docs/mix_check.py default cold-end       # recipes of results/compare.json, after `make compare`

The FID's features are the digit classifier's penultimate layer, which clusters by digit, so the proportions of
the ten digits move the features' mean more than any stroke does. The evaluate stage reports this for every run
(`fid_real_mix`, `fid_even_mix`: pipeline/evaluate.py); this script computes it for runs made before it did. For
every run of the given recipes whose samples are still in this repository's DVC cache (the `make compare`
experiments), it scores the run's samples as its evaluate stage did (the same draws: `fid` comes out as the run's)
and prints `fid_real_mix` (real training digits in the samples' proportions), `fid_even_mix` (the samples resampled
to equal counts of every digit) and the samples' count of each predicted digit.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import data  # noqa: E402
from pipeline.buffer import uniform_noise  # noqa: E402
from pipeline.evaluate import classifier_metrics  # noqa: E402
from pipeline.experiments import cached_outputs, params_at  # noqa: E402
from pipeline.model import IMAGE_SHAPE  # noqa: E402
from pipeline.stages.common import load_classifier  # noqa: E402

DEVICE = torch.device("cpu")
KEYS = ("fid", "fid_real_mix", "fid_even_mix")


def main() -> None:
    recipes = sys.argv[1:] or ["default"]
    test, train = data.load_split("data/prepared/test.pt"), data.load_split("data/prepared/train.pt")
    runs = [r for r in json.loads(Path("results/compare.json").read_text()) if r["recipe"] in recipes]
    print("| recipe | seed | FID | `fid_real_mix` | `fid_even_mix` | samples per digit 0–9 |\n|---|---|---|---|---|---|")
    found: dict[str, list[dict[str, float]]] = {}
    for run in runs:
        files = cached_outputs(Path("."), run["rev"], "samples/samples.npy", "models/classifier.pt")
        if files is None:
            print(f"| {run['recipe']} | {run['seed']} | {run['fid']:.1f} | (outputs not found here) | | |")
            continue
        samples_file, classifier_file = files
        params = params_at(Path("."), run["rev"])
        generator = torch.Generator().manual_seed(params.evaluate.seed)  # the evaluate stage's draws, in its order
        uniform_noise(params.evaluate.n_noise, IMAGE_SHAPE, device="cpu", generator=generator)
        m, per_digit = classifier_metrics(
            load_classifier(classifier_file, DEVICE), torch.from_numpy(np.load(samples_file)), test.images,
            train.images, DEVICE, params.evaluate.confidence, generator,
        )
        found.setdefault(run["recipe"], []).append(m)
        cells = " | ".join(f"{m[k]:.1f}" for k in KEYS)
        print(f"| {run['recipe']} | {run['seed']} | {cells} | {' '.join(map(str, per_digit.tolist()))} |")
    for recipe, rows in found.items():
        cells = " | ".join(f"{statistics.fmean(r[k] for r in rows):.1f}" for k in KEYS)
        print(f"| {recipe}, mean of {len(rows)} | | {cells} | |")


if __name__ == "__main__":
    main()
