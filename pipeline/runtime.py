"""Device choice, threads and seeding: the few process-wide settings every stage shares."""

from __future__ import annotations

import random

import numpy as np
import torch

from pipeline.config import RuntimeConfig


def resolve_device(cfg: RuntimeConfig) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an explicit device must exist."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(cfg.flush_denormal)  # a no-op (returns False) where unsupported
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device={cfg.device} but CUDA is not available; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"runtime.device={cfg.device} but MPS is not available; use auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def chain_workers(workers: int, device: torch.device) -> int:
    """How many groups of Langevin chains to run side by side: ``workers``, or one per core (CPU) if 0."""
    if device.type != "cpu":
        return 1
    return workers if workers > 0 else torch.get_num_threads()


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
