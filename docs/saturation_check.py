"""How much of the FID is saturation: the tables of docs/experiments.md, "Grey edges".

    python docs/saturation_check.py            # after `make run` (prepared data and classifier)

1. Real training digits with their contrast raised (clamp(a x, -1, 1)): same shapes, fewer grey edge pixels,
   scored like samples (FID against the held-out digits, confident share, grey share).
2. Every run of results/compare.json whose samples are still in the DVC cache (the `make compare`
   experiments of this repository): its FID beside `fid_real_saturated`, the FID of real digits saturated
   to the samples' grey share. Runs whose outputs are not in the cache are listed as such.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import data  # noqa: E402
from pipeline.evaluate import classifier_metrics, grey_share  # noqa: E402
from pipeline.experiments import cached_outputs  # noqa: E402
from pipeline.stages.common import load_classifier  # noqa: E402

DEVICE = torch.device("cpu")
TEST = data.load_split("data/prepared/test.pt")
TRAIN = data.load_split("data/prepared/train.pt")


def metrics(classifier, images: torch.Tensor) -> dict[str, float]:
    m, _ = classifier_metrics(classifier, images, TEST.images, TRAIN.images, DEVICE, 0.9, torch.Generator().manual_seed(0))
    return m


def main() -> None:
    classifier = load_classifier("models/classifier.pt", DEVICE)
    real = TRAIN.images[torch.randperm(len(TRAIN.images), generator=torch.Generator().manual_seed(1))[:1000]]
    print("| real training digits | FID | confident | grey share |\n|---|---|---|---|")
    for contrast in (1.0, 1.25, 1.5, 2.0, 3.0, 5.0, float("inf")):
        x = real.sign() if contrast == float("inf") else (real * contrast).clamp(-1, 1)
        m = metrics(classifier, x)
        name = "saturated (sign)" if contrast == float("inf") else f"contrast x{contrast:g}"
        print(f"| {name} | {m['fid']:.1f} | {m['confident_share']:.3f} | {grey_share(x):.3f} |")

    runs = json.loads(Path("results/compare.json").read_text())
    print("\n| recipe | seed | FID | fid_real_saturated | grey share (real 0.080) | confident |\n|---|---|---|---|---|---|")
    for run in runs:
        files = cached_outputs(Path("."), run["rev"], "samples/samples.npy", "models/classifier.pt")
        if files is None:
            print(f"| {run['recipe']} | {run['seed']} | {run['fid']:.1f} | (outputs not found here) | | |")
            continue
        samples_file, classifier_file = files
        m = metrics(load_classifier(classifier_file, DEVICE), torch.from_numpy(np.load(samples_file)))
        print(
            f"| {run['recipe']} | {run['seed']} | {m['fid']:.1f} | {m['fid_real_saturated']:.1f} | "
            f"{m['grey_share']:.3f} | {m['confident_share']:.3f} |"
        )


if __name__ == "__main__":
    main()
