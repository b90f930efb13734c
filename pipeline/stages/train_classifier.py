"""Stage ``train_classifier``: the digit classifier whose features FID is computed in."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline import data
from pipeline.checkpoint import atomic_save
from pipeline.classifier import accuracy, train_classifier
from pipeline.config import Params
from pipeline.runtime import resolve_device
from pipeline.stages.common import CLASSIFIER_FORMAT, split_path, write_json


def run(params: Params, progress: str | bool = True) -> dict:
    """``progress``: bar, lines or off (pipeline/progress.py)."""
    device = resolve_device(params.runtime)  # an absent device stops the stage before any work
    train_split = data.load_split(split_path(params, "train"))
    test_split = data.load_split(split_path(params, "test"))
    start = time.perf_counter()
    model = train_classifier(
        params.classifier, train_split.images, train_split.labels, device,
        progress=progress, progress_seconds=params.runtime.progress_seconds,
    )
    acc = accuracy(model, test_split.images, test_split.labels, device)
    path = Path(params.paths.classifier)
    atomic_save(
        {
            "format": CLASSIFIER_FORMAT,
            "feature_dim": params.classifier.feature_dim,
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
        },
        path,
    )
    metrics = {"test_accuracy": round(acc, 6), "train_seconds": round(time.perf_counter() - start, 2)}
    write_json(metrics, Path(params.paths.metrics_dir) / "classifier.json")
    print(f"train_classifier: test accuracy {acc:.4f} -> {path}")
    return metrics
