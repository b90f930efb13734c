"""Device choice, threads and seeding: the few process-wide settings every stage shares."""

from __future__ import annotations

import platform
import random
from pathlib import Path

import numpy as np
import torch

from pipeline.config import RuntimeConfig


class DeviceError(RuntimeError):
    """The configured device is not present on this machine, worded as one line (exit code 2, as a bad param)."""


def resolve_device(cfg: RuntimeConfig) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an explicit device must exist (else ``DeviceError``)."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(cfg.flush_denormal)  # a no-op (returns False) where unsupported
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(cfg.device)
    fix = "set runtime.device: auto (or cpu)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"runtime: runtime.device={cfg.device} but this machine has no usable CUDA device; {fix}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(
                f"runtime: runtime.device={cfg.device} but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); choose one of those, or set runtime.device: auto"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"runtime: runtime.device={cfg.device} but MPS (Apple GPU) is not available here; {fix}")
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


def bf16_is_native(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 arithmetic in hardware, rather than emulating it in fp32.

    CPU: oneDNN's bf16 kernels on AVX512-BF16 or AMX. Elsewhere (AVX2, or AVX-512 without
    BF16) oneDNN emulates bf16 by conversions around fp32 arithmetic, several times slower than
    fp32 itself. CUDA: a GPU with bf16 units (compute capability 8.0 and newer).
    """
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(native and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(requested: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the hardware runs bf16 natively, else ``fp32``; explicit choices stay."""
    if requested != "auto":
        return requested
    return "bf16" if bf16_is_native(device) else "fp32"


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it (``lscpu``'s "Model name"), or what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device: torch.device) -> dict[str, str]:
    """What a run ran on, for the benchmark's first line and the MLflow tags."""
    if device.type == "cuda":
        return {"device": describe(device), "bf16_native": str(bf16_is_native(device)).lower()}
    return {
        "device": describe(device),
        "cpu_model": cpu_model(),
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "bf16_native": str(bf16_is_native(device)).lower(),
    }


def named_seed(seed: int, name: str) -> int:
    """A seed derived from ``seed`` and a name, so each named stream (an OOD case, a restoration task)
    draws the same numbers whichever other streams exist and in whatever order they run."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
