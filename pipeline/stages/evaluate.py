"""Stage ``evaluate``: energy separation, FID, classifier confidence and coverage, histograms,
and the in/out score threshold stored with the model (``paths.threshold``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline import data, tracking
from pipeline.buffer import uniform_noise
from pipeline.config import Params
from pipeline.evaluate import acceptance_threshold, classifier_metrics, energy_separation, score_images
from pipeline.figures import save_histograms
from pipeline.model import IMAGE_SHAPE
from pipeline.runtime import resolve_device
from pipeline.stages.common import file_md5, load_classifier, load_energy_model, split_path, write_json


def run(params: Params) -> dict:
    # An absent device or input stops the stage before anything is touched; then the MLflow run is
    # reopened, so a store or run that cannot be used stops it before any scoring.
    device = resolve_device(params.runtime)
    model, _ = load_energy_model(params.paths.model, device)
    classifier = load_classifier(params.paths.classifier, device)
    test_split = data.load_split(split_path(params, "test"))
    train_split = data.load_split(split_path(params, "train"))
    samples_path = Path(params.paths.samples_dir) / "samples.npy"
    if not samples_path.is_file():
        raise data.DataError(f"evaluate: {samples_path} not found; run the generate stage first")
    try:
        samples = torch.from_numpy(np.load(samples_path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise data.DataError(
            f"evaluate: {samples_path} is not a samples array ({type(exc).__name__}); run the generate stage again"
        ) from None
    if samples.ndim != 4 or tuple(samples.shape[1:]) != IMAGE_SHAPE:
        raise data.DataError(
            f"evaluate: {samples_path} holds shape {tuple(samples.shape)}, expected (N, 1, 32, 32); "
            "run the generate stage again"
        )
    tracker = tracking.resume_run(params.tracking, tracking.read_run_info(params.paths.run_info), params.flat())
    generator = torch.Generator().manual_seed(params.evaluate.seed)
    noise = uniform_noise(params.evaluate.n_noise, IMAGE_SHAPE, device="cpu", generator=generator)

    scores = {
        "real digits (test)": score_images(model, test_split.images, device),
        "uniform noise": score_images(model, noise, device),
        "generated samples": score_images(model, samples, device),
    }
    metrics = energy_separation(*scores.values())
    cls_metrics, per_digit = classifier_metrics(
        classifier,
        samples,
        test_split.images,
        train_split.images,
        device,
        params.evaluate.confidence,
        generator,
    )
    metrics.update(cls_metrics)
    metrics = {k: round(v, 6) for k, v in metrics.items()}
    metrics_path = Path(params.paths.metrics_dir) / "evaluate.json"
    write_json({**metrics, "samples_per_digit": per_digit.tolist()}, metrics_path)
    threshold = write_threshold(params, scores["real digits (test)"])

    plots = Path(params.paths.plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    save_histograms(scores, plots / "energy_hist.png", bins=params.evaluate.hist_bins)

    tracker.log_dataset(  # the held-out split the FID compares with; train logged the training split
        name=f"{params.data.source}-test",
        digest=file_md5(split_path(params, "test")),
        source=split_path(params, "test"),
        features=test_split.images.numpy(),
        targets=test_split.labels.numpy(),
        context="evaluation",
    )
    tracker.log_metrics_file(metrics_path)  # evaluate.<key>
    tracker.log_metrics_file(Path(params.paths.metrics_dir) / "classifier.json")  # classifier.<key>: FID's features
    tracker.set_tags({"dvc.model_md5": file_md5(params.paths.model)})
    tracker.log_artifact(plots / "energy_hist.png", "figures")
    tracker.log_artifact(params.paths.threshold, "metrics")
    tracker.close("FINISHED")
    print("evaluate: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    print(
        f"evaluate: in/out threshold {threshold['threshold']:.4g} (accepts {threshold['accepted_heldout']:.1%} "
        f"of the held-out digits) -> {params.paths.threshold}"
    )
    return metrics


def write_threshold(params: Params, real_scores: np.ndarray) -> dict:
    """The score at or above which ``python -m pipeline score`` calls an image a digit: the one that
    accepts ``evaluate.accept_share`` of the held-out digits, beside the md5 of the model it belongs to."""
    threshold = acceptance_threshold(real_scores, params.evaluate.accept_share)
    record = {
        "threshold": threshold,
        "accept_share": params.evaluate.accept_share,
        "accepted_heldout": float((real_scores >= threshold).mean()),
        "n_heldout": len(real_scores),
        "score": "s(x) = -E(x) of the model in float32; higher is more digit-like",
        "model_md5": file_md5(params.paths.model),
    }
    write_json(record, params.paths.threshold)
    return record
