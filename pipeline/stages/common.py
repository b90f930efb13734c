"""Helpers shared by the stages: file digests, JSON output, split paths, model and threshold loading."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import MODEL_FORMAT, CheckpointError, safe_load
from pipeline.config import ModelConfig, Params
from pipeline.data import DataError
from pipeline.model import EnergyNet

CLASSIFIER_FORMAT = "digit-classifier/1"


def file_md5(path: str | Path) -> str:
    """The md5 DVC records for a file output."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def split_path(params: Params, name: str) -> Path:
    return Path(params.paths.prepared_dir) / f"{name}.pt"


def load_energy_model(path: str | Path, device: torch.device) -> tuple[EnergyNet, dict]:
    """Rebuild the network from the config stored beside its weights."""
    if not Path(path).is_file():
        raise CheckpointError(f"model: {path} not found; run the train stage first (dvc repro train)")
    blob = safe_load(path, MODEL_FORMAT)
    cfg = blob["model_config"]
    model = EnergyNet.from_config(ModelConfig(channels=tuple(cfg["channels"]), hidden=int(cfg["hidden"])))
    model.load_state_dict(blob["model"])
    return model.to(device).eval(), blob


def load_snapshots(model: EnergyNet, blob: dict, count: int, path: str | Path) -> list[EnergyNet]:
    """The networks generation samples with: ``model`` (the final weights) for ``count`` 1, else the model
    file's last ``count`` snapshots (train.snapshots), the final one first."""
    if count == 1:
        return [model]
    kept = blob.get("snapshots") or []
    if len(kept) < count:
        raise CheckpointError(
            f"generate.snapshots is {count}, but {path} keeps {len(kept)} snapshot{'' if len(kept) == 1 else 's'} "
            "of its training; "
            f"set train.snapshots to at least {count} and train again (dvc repro), or lower generate.snapshots"
        )
    nets = []
    for snap in reversed(kept[-count:]):
        net = copy.deepcopy(model)
        net.load_state_dict(snap["model"])
        nets.append(net.eval())
    return nets


def read_threshold(params: Params, who: str) -> float:
    """The in/out score threshold that ``evaluate`` stored with the model, checked to belong to the model on disk."""
    path = Path(params.paths.threshold)
    if not path.is_file():
        raise DataError(f"{who}: {path} not found; run `dvc repro` (the evaluate stage writes it)")
    try:
        record = json.loads(path.read_text())
        threshold, model_md5 = float(record["threshold"]), str(record["model_md5"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{who}: {path} is not a threshold file ({type(exc).__name__})") from None
    if model_md5 != file_md5(params.paths.model):
        raise DataError(
            f"{who}: {path} was chosen for another model than {params.paths.model}; run `dvc repro evaluate`"
        )
    return threshold


def load_classifier(path: str | Path, device: torch.device):
    from pipeline.classifier import DigitClassifier

    if not Path(path).is_file():
        raise CheckpointError(f"classifier: {path} not found; run the train_classifier stage first")
    blob = safe_load(path, CLASSIFIER_FORMAT)
    model = DigitClassifier(int(blob["feature_dim"]))
    model.load_state_dict(blob["model"])
    return model.to(device).eval()
