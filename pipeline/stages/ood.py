"""Stage ``ood``: held-out digits against each out-of-distribution case, by the trained energy's score.

Writes ``metrics/ood.json`` (per case: ROC AUC, share accepted at the in/out threshold, mean score),
the same as a markdown table in ``metrics/ood.md``, the score histograms per case
(``plots/ood_scores.png``) and examples of every case (``plots/ood_cases.png``); all of it goes to
the MLflow run that trained the model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline import data, tracking
from pipeline.config import OodConfig, Params
from pipeline.evaluate import score_images
from pipeline.figures import save_ood_scores, save_rows
from pipeline.ood import case_metrics, make_cases, markdown_table
from pipeline.runtime import resolve_device
from pipeline.stages.common import load_energy_model, read_threshold, split_path, write_json

EXAMPLES_PER_NOISE_CASE = 10  # columns of the noise cases in plots/ood_cases.png


def example_rows(images: torch.Tensor, labels: torch.Tensor, cfg: OodConfig) -> dict[str, list]:
    """The first held-out digit of each class, and each case made from them by the stage's own code, in
    columns: a digit a case leaves out (flip, rotate) is a blank."""
    first = [int((labels == d).nonzero()[0]) for d in labels.unique().tolist()]
    digits, classes = images[first], labels[first]
    rows: dict[str, list] = {"held-out": list(digits)}
    excluded = {"flip": cfg.flip_exclude, "rotate": cfg.rotate_exclude}
    for name, made in make_cases(digits, classes, cfg).items():
        if name in excluded:
            kept = iter(made)
            rows[name] = [None if int(c) in excluded[name] else next(kept) for c in classes]
        elif name in ("uniform", "gaussian"):
            rows[name] = list(made[:EXAMPLES_PER_NOISE_CASE])
        else:
            rows[name] = list(made)
    return rows


def run(params: Params) -> dict:
    # Reopened first: a store or run that cannot be used stops the stage before any scoring.
    tracker = tracking.resume_run(params.tracking, tracking.read_run_info(params.paths.run_info), params.flat())
    device = resolve_device(params.runtime)
    model, _ = load_energy_model(params.paths.model, device)
    threshold = read_threshold(params, "ood")
    test_split = data.load_split(split_path(params, "test"))
    cases = make_cases(test_split.images, test_split.labels, params.ood)

    real = score_images(model, test_split.images, device)
    scores = {name: score_images(model, images, device) for name, images in cases.items()}
    metrics = {k: round(v, 6) for k, v in case_metrics(real, scores, threshold).items()}
    metrics_dir = Path(params.paths.metrics_dir)
    write_json(metrics, metrics_dir / "ood.json")
    counts = {"real": len(real), **{name: len(s) for name, s in scores.items()}}
    table = markdown_table(metrics, counts, threshold)
    (metrics_dir / "ood.md").write_text(table)

    plots = Path(params.paths.plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    aucs = {name: metrics[f"ood_auc_{name}"] for name in scores}
    save_ood_scores(real, scores, aucs, threshold, plots / "ood_scores.png", bins=params.ood.hist_bins)
    save_rows(
        example_rows(test_split.images, test_split.labels, params.ood),
        plots / "ood_cases.png",
        "A held-out digit of each class and what each case makes of it (grey: left out of that case)",
    )

    tracker.log_metrics_file(metrics_dir / "ood.json")  # ood.<key>
    tracker.log_artifact(metrics_dir / "ood.md", "metrics")
    tracker.log_artifact(plots / "ood_scores.png", "figures")
    tracker.log_artifact(plots / "ood_cases.png", "figures")
    tracker.close("FINISHED")
    print(table, end="")
    return metrics
