"""Stage ``train``: contrastive-divergence training, tracked as one MLflow run.

``python -m pipeline train`` trains in one process; ``torchrun --nproc-per-node N -m pipeline
train`` trains data-parallel on N processes (``pipeline/distributed.py``), where rank 0 alone
talks to MLflow and writes the outputs.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import data, distributed, provenance, tracking
from pipeline.buffer import uniform_noise
from pipeline.checkpoint import MODEL_FORMAT, atomic_save
from pipeline.config import Params
from pipeline.figures import image_grid, save_curves
from pipeline.model import IMAGE_SHAPE, EnergyNet, count_parameters
from pipeline.runtime import describe, hardware, seed_everything
from pipeline.stages.common import file_md5, split_path, write_json
from pipeline.train import Trainer, TrainingInterrupted, steps_per_epoch

CHECKPOINT_NAME = "last.pt"
# MLflow image series (key, one image per step); the "samples/" prefix makes them a section of their own,
# the first on the run page's Model metrics tab.
BUFFER_IMAGES = "samples/replay_buffer"

def run(params: Params, progress: str | bool = True) -> dict:
    """``progress``: bar, lines or off (pipeline/progress.py); only rank 0 shows it."""
    dist, device = distributed.init(params.runtime)  # one process, or this rank of a torchrun job
    try:
        return _run(params, progress, dist, device)
    finally:
        distributed.teardown(dist)


def _run(params: Params, progress: str | bool, dist: distributed.Dist, device: torch.device) -> dict:
    # Everything that can be wrong is checked before anything is written: the device (above), the data
    # (enough images for one batch per process), then the MLflow store (on rank 0; every rank raises).
    train_split = data.load_split(split_path(params, "train"))
    steps_per_epoch(len(train_split), dist.world_size, params.train.batch_size)
    dist.on_main(lambda: tracking.preflight(params.tracking))
    seed_everything(params.train.seed)
    checkpoint = Path(params.paths.checkpoint_dir) / CHECKPOINT_NAME

    trainer = Trainer(
        params, train_split.images, device, tracking.NullTracker(), checkpoint,
        progress=progress if dist.is_main else "off", dist=dist,
    )
    resumed = trainer.try_resume()

    data_md5 = {split: file_md5(split_path(params, split)) for split in ("train", "test")}

    def open_run() -> tracking.MlflowTracker | tracking.NullTracker:
        run_id = Trainer.checkpoint_run_id(checkpoint) if resumed else None
        if run_id:
            return tracking.resume_run(params.tracking, run_id, params.flat())
        return tracking.start_run(
            params.tracking,
            run_name=f"train-{time.strftime('%Y%m%d-%H%M%S')}",
            generated=tuple(dataclasses.asdict(params.paths).values()),
            stage="train",
            description=provenance.describe_run(
                params.flat(),
                where=Path.cwd(),
                root=tracking.project_root(),
                stage="train",
                experiment=tracking.dvc_experiment_tags(),
                data={"source": params.data.source, **data_md5},
            ),
        )

    tracker = dist.on_main(open_run) or tracking.NullTracker()  # only rank 0 talks to MLflow
    trainer.tracker = tracker
    if resumed:
        if dist.is_main:
            print(f"train: resuming from step {trainer.step} of {trainer.total_steps} ({checkpoint})")
    else:
        trainer.save_checkpoint()  # records the run id, so a resume after a kill logs into the same run
    if not resumed:  # a resume runs in the same precision (Trainer.try_resume refuses another)
        tracker.log_params(
            {**params.flat(), "langevin.precision_resolved": trainer.precision, "langevin.kernels_resolved": trainer.kernels}
        )
        # The training split as the run's dataset input, named after its source, digest = DVC's md5
        # (evaluate adds the test split).
        tracker.log_dataset(
            name=f"{params.data.source}-train",
            digest=data_md5["train"],
            source=split_path(params, "train"),
            features=train_split.images.numpy(),
            targets=train_split.labels.numpy(),
            context="training",
        )
    tracker.set_tags(
        {
            **{f"hardware.{k}": v for k, v in hardware(device).items()},
            "precision": trainer.precision,
            "kernels": trainer.kernels,
            "device": describe(device),
            "torch": torch.__version__,
            "model.parameters": str(count_parameters(trainer.model)),
            "dvc.data_md5.train": data_md5["train"],
            "dvc.data_md5.test": data_md5["test"],
            "train.world_size": str(dist.world_size),
        }
    )

    samples_every = params.train.sample_every
    if samples_every and not resumed:
        # Step 0 of the series: what an empty buffer hands the sampler, uniform noise (a generator of its
        # own: training's random streams stay untouched). MLflow's image card opens on step 0.
        start = uniform_noise(64, IMAGE_SHAPE, device="cpu", generator=torch.Generator().manual_seed(params.train.seed))
        tracker.log_image(image_grid(start, nrow=8), key=BUFFER_IMAGES, step=0)

    def on_log(step: int, tr: Trainer) -> None:
        if samples_every and step % samples_every == 0 and len(tr.buffer):
            # 64 replay-buffer images as one series: the run page steps through it with a slider.
            tracker.log_image(image_grid(tr.buffer.images()[-64:], nrow=8), key=BUFFER_IMAGES, step=step)

    try:
        result = trainer.fit(on_log=on_log if dist.is_main else None)
    except TrainingInterrupted:
        tracker.close("KILLED")
        raise
    except BaseException:
        tracker.close("FAILED")
        raise
    if not dist.is_main:
        return {}  # rank 0 writes the outputs and closes the MLflow run

    model_path = Path(params.paths.model)
    atomic_save(
        {
            "format": MODEL_FORMAT,
            # The weights to sample with: the moving average when train.ema_decay > 0, else the trained ones.
            "model": {k: v.detach().cpu() for k, v in result.model.state_dict().items()},
            "ema": trainer.ema is not None,
            "trained_model": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
            # The sampling weights of the last iterations (train.snapshots), oldest first; the last is "model".
            "snapshots": [{"step": step, "model": weights} for step, weights in trainer.snapshots],
            "model_config": {"channels": list(params.model.channels), "hidden": params.model.hidden},
            "params": params.flat(),
            "precision": trainer.precision,
            "steps": result.steps,
        },
        model_path,
    )
    tracking.write_run_info(params.paths.run_info, tracker, params.tracking.experiment)

    last = result.history[-1]
    metrics = {
        "steps": result.steps,
        "final_loss": last["loss"],
        "final_real_score": last["real_score"],
        "final_fake_score": last["fake_score"],
        "rollbacks": result.rollbacks,
        "train_seconds": round(result.seconds, 2),
        "seconds_per_step": round(result.seconds / max(1, result.steps - result.resumed_from), 4),
        "precision": trainer.precision,
        "kernels": trainer.kernels,
    }
    write_json(metrics, Path(params.paths.metrics_dir) / "train.json")
    plots = Path(params.paths.plots_dir)
    plots.mkdir(parents=True, exist_ok=True)
    keys = list(result.history[0].keys())
    lines = [",".join(keys)] + [",".join(f"{row[k]:.6g}" for k in keys) for row in result.history]
    (plots / "train.csv").write_text("\n".join(lines) + "\n")
    save_curves(result.history, plots / "train_curves.png")

    tracker.log_metrics_file(Path(params.paths.metrics_dir) / "train.json", step=result.steps)  # train.<key>
    tracker.set_tags({"dvc.model_md5": file_md5(model_path)})
    tracker.log_artifact(plots / "train_curves.png", "figures")
    if params.tracking.log_model:
        cpu_model = EnergyNet.from_config(params.model)
        cpu_model.load_state_dict({k: v.detach().cpu() for k, v in result.model.state_dict().items()})
        tracker.log_model(cpu_model.eval(), np.zeros((2, 1, 32, 32), dtype=np.float32))
    tracker.close("FINISHED")
    checkpoint.unlink(missing_ok=True)  # the model file is the result; a stale checkpoint would be resumed
    print(
        f"train: {result.steps} steps in {result.seconds:.1f}s on {describe(device)}, sampler in {trainer.precision} ({trainer.kernels} kernels); "
        f"final loss {last['loss']:.4f} -> {model_path}"
    )
    return metrics
