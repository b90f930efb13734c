"""Atomic save and safe load of training state and of the final model file."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FORMAT = "ebm-train-checkpoint/1"
MODEL_FORMAT = "ebm-model/1"


class CheckpointError(RuntimeError):
    """A missing, truncated or foreign checkpoint, worded as one line."""


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def safe_load(path: str | Path, expected_format: str) -> dict[str, Any]:
    """Load with ``weights_only=True`` and check the format tag; any failure is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint: {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or unsafe pickle
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint: {path} cannot be loaded (truncated or not a checkpoint): {reason}") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"checkpoint: {path} is not a {expected_format} file (found {found!r})")
    return obj


def rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    """Every RNG the run touches: torch (CPU and CUDA), numpy, Python, and named generators."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": _python_state_to_safe(random.getstate()),
        "generators": {name: g.get_state() for name, g in generators.items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    random.setstate(_python_state_from_safe(state["python"]))
    for key, g in generators.items():
        g.set_state(state["generators"][key])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_safe(state: tuple) -> list:
    version, internal, gauss = state
    return [version, torch.tensor(internal, dtype=torch.int64), gauss]


def _python_state_from_safe(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(int(v) for v in internal.tolist()), gauss)
