"""Stage ``generate``: samples from uniform noise, the sample grid and the chain figure."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from pipeline import tracking
from pipeline.config import Params
from pipeline.figures import image_grid, save_chain, save_grid
from pipeline.generate import generate_samples
from pipeline.langevin import resolve_kernels
from pipeline.runtime import resolve_device, resolve_precision
from pipeline.stages.common import load_energy_model, load_snapshots, write_json

SAMPLE_IMAGES = "samples/generated"  # the final sample grid, an MLflow image series (a section "samples" in the UI)


def run(params: Params, progress: str | bool = True) -> dict:
    """``progress``: bar, lines or off (pipeline/progress.py)."""
    # An absent device or model file stops the stage before anything is touched; then the MLflow run is
    # reopened, so a store or run that cannot be used stops it before any sampling.
    device = resolve_device(params.runtime)
    model, blob = load_energy_model(params.paths.model, device)
    nets = load_snapshots(model, blob, params.generate.snapshots, params.paths.model)
    tracker = tracking.resume_run(params.tracking, tracking.read_run_info(params.paths.run_info), params.flat())
    start = time.perf_counter()
    samples, snapshots = generate_samples(
        nets, params.generate, params.langevin, device,
        progress=progress, progress_seconds=params.runtime.progress_seconds,
    )
    seconds = time.perf_counter() - start
    out = Path(params.paths.samples_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "samples.npy", samples.numpy().astype(np.float32))
    save_grid(
        samples[:100],
        out / "samples.png",
        nrow=10,
        title=f"{params.generate.steps} Langevin steps of size {params.generate.step_size:g} from noise"
        + (
            f" (last {params.generate.final_steps} at noise {params.generate.final_noise:g})"
            if params.generate.final_steps
            else ""
        )
        + (", EMA weights" if blob.get("ema") else "")
        + (f"\nchains split over the last {len(nets)} snapshots of the weights" if len(nets) > 1 else ""),
    )
    save_chain(snapshots, out / "chain.png")
    metrics = {
        "generate_seconds": round(seconds, 2),
        "n_samples": len(samples),
        "steps": params.generate.steps,
        "snapshots": len(nets),
        "precision": resolve_precision(params.langevin.precision, device),
        "kernels": resolve_kernels(params.langevin.kernels, params.langevin.precision, device),
    }
    write_json(metrics, Path(params.paths.metrics_dir) / "generate.json")

    tracker.log_metrics_file(Path(params.paths.metrics_dir) / "generate.json")  # generate.<key>
    tracker.log_artifact(out / "samples.png", "figures")
    # The same 100 samples as an image series at the model's training step: the compare view puts
    # two runs' samples side by side.
    tracker.log_image(image_grid(samples[:100], nrow=10), key=SAMPLE_IMAGES, step=int(blob.get("steps", 0)))
    tracker.log_artifact(out / "chain.png", "figures")
    tracker.close("FINISHED")
    print(f"generate: {len(samples)} samples x {params.generate.steps} steps in {seconds:.1f}s -> {out}")
    return metrics
