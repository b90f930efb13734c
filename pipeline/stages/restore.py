"""Stage ``restore``: damage held-out digits, restore them by masked Langevin dynamics on the energy.

Writes ``metrics/restore.json`` (per task: the digit classifier's accuracy and the MSE to the
originals, restored against damaged, and the mean scores), the same as a markdown table in
``metrics/restore.md``, and ``plots/restore.png`` (rows original / damaged / restored per task); all
of it goes to the MLflow run that trained the model.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline import data, tracking
from pipeline.config import Params
from pipeline.evaluate import score_images
from pipeline.figures import save_rows
from pipeline.langevin import score_in_precision
from pipeline.model import frozen
from pipeline.progress import Progress
from pipeline.restore import TASKS, damage, describe, markdown_table, restore, task_metrics
from pipeline.runtime import named_seed, resolve_device
from pipeline.stages.common import load_classifier, load_energy_model, split_path, write_json


def run(params: Params, progress: str | bool = True) -> dict:
    """``progress``: bar, lines or off (pipeline/progress.py)."""
    # Reopened first: a store or run that cannot be used stops the stage before any sampling.
    tracker = tracking.resume_run(params.tracking, tracking.read_run_info(params.paths.run_info), params.flat())
    cfg = params.restore
    device = resolve_device(params.runtime)
    model, _ = load_energy_model(params.paths.model, device)
    classifier = load_classifier(params.paths.classifier, device)
    test_split = data.load_split(split_path(params, "test"))
    pick = torch.randperm(len(test_split), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n_images]
    originals, labels = test_split.images[pick], test_split.labels[pick]
    score_fn = score_in_precision(model, params.langevin.precision, params.langevin.kernels)

    start = time.perf_counter()
    bar = Progress(
        "restore", len(TASKS) * cfg.steps, mode=progress, interval=params.runtime.progress_seconds, unit="step"
    )
    metrics: dict[str, float] = {}
    rows: dict[str, torch.Tensor] = {"original": originals[: cfg.figure_columns]}
    for task in TASKS:
        damaged, mask = damage(task, originals, cfg, torch.Generator().manual_seed(named_seed(cfg.seed, task)))
        langevin_generator = torch.Generator(device=device).manual_seed(named_seed(cfg.seed, f"{task}:langevin"))
        with frozen(model):
            restored = restore(
                score_fn, damaged.to(device), mask, cfg, params.langevin, langevin_generator,
                progress=lambda _step: bar.update(1),
            ).cpu()
        images = {"original": originals, "damaged": damaged, "restored": restored}
        scores = {kind: score_images(model, x, device) for kind, x in images.items()}
        metrics.update(task_metrics(task, classifier, labels, images, scores, device))
        rows[f"{task}: damaged"] = damaged[: cfg.figure_columns]
        rows[f"{task}: restored"] = restored[: cfg.figure_columns]
    bar.close()
    seconds = time.perf_counter() - start

    metrics = {k: round(v, 6) for k, v in metrics.items()}
    metrics_dir = Path(params.paths.metrics_dir)
    write_json({**metrics, "restore_seconds": round(seconds, 2)}, metrics_dir / "restore.json")
    table = markdown_table(metrics, {task: describe(task, cfg) for task in TASKS}, len(originals))
    (metrics_dir / "restore.md").write_text(table)
    plots = Path(params.paths.plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    save_rows(
        rows,
        plots / "restore.png",
        "\n".join(
            [f"Restoration: {cfg.steps} Langevin steps of size {cfg.step_size:g} on the damaged pixels only"]
            + [f"{task}: {describe(task, cfg)}" for task in TASKS]
        ),
    )

    tracker.log_metrics_file(metrics_dir / "restore.json")  # restore.<key>
    tracker.log_artifact(metrics_dir / "restore.md", "metrics")
    tracker.log_artifact(plots / "restore.png", "figures")
    tracker.close("FINISHED")
    print(table, end="")
    print(f"restore: {len(TASKS)} tasks x {len(originals)} digits x {cfg.steps} steps in {seconds:.1f}s")
    return metrics
