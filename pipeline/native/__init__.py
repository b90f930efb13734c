"""Build and load the compiled kernels of ``kernels.c`` (the CPU sampler's fp32 input gradient).

The library is compiled once per source and compiler, on first use, with the machine's C compiler
(``$CC``, else ``cc``), into ``build/`` next to the source (``$EBM_KERNELS_DIR`` overrides), and
loaded with ctypes; calls release the GIL, so groups of chains on threads run them side by side.
It targets x86-64 with AVX2 and FMA (every CPU this project meets: AVX2 and AVX-512 kinds alike).
Where it cannot be built or loaded, ``load()`` returns None and ``reason()`` says why, in one line.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fno-trapping-math", "-fno-math-errno", "-ffinite-math-only", "-fno-signed-zeros", "-fPIC", "-shared", "-std=c11", "-ffp-contract=fast")

_lock = threading.Lock()
_state: dict[str, object] = {}

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    "swish_fwd": [_P, _P, _P, _I],
    "im2col_1ch_s2": [_P, _P] + [_I] * 7,
    "col2im_1ch_s2": [_P, _P] + [_I] * 7,
    "col2im_s2": [_P, _P, _P] + [_I] * 8,
}


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _build_dir() -> Path:
    return Path(os.environ.get("EBM_KERNELS_DIR", SOURCE.with_name("build")))


def _cpu_supported() -> str | None:
    """None where the CPU runs the library's instructions, else why not."""
    isa = torch.backends.cpu.get_cpu_capability()
    if isa not in ("AVX2", "AVX512"):
        return f"the CPU reports {isa}, not AVX2"
    return None


def _build() -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise OSError(f"no C compiler ({os.environ.get('CC', 'cc')} not on PATH)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, version)).encode()).hexdigest()[:16]
    target = _build_dir() / f"kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # then an atomic rename: parallel builds are safe
            partial = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial)], capture_output=True, text=True)
            if result.returncode != 0:
                first = (result.stderr.strip().splitlines() or ["no message"])[0]
                raise OSError(f"{Path(compiler).name} failed on {SOURCE.name}: {first}")
            os.replace(partial, target)
    lib = ctypes.CDLL(str(target))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    return lib


def load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None where it cannot be had here (see ``reason``)."""
    with _lock:
        if "lib" not in _state:
            why = _cpu_supported()
            lib = None
            if why is None:
                try:
                    lib = _build()
                except OSError as err:
                    why = str(err)
            _state["lib"], _state["reason"] = lib, why
        return _state["lib"]  # type: ignore[return-value]


def reason() -> str | None:
    """Why ``load()`` gave None (one line), or None when the library is loaded."""
    load()
    return _state["reason"]  # type: ignore[return-value]


def warn_fallback() -> None:
    """Say once per process, on stderr, that the fp32 CPU sampler runs without the compiled kernels, and why."""
    with _lock:
        if _state.get("warned"):
            return
        _state["warned"] = True
    print(
        f"langevin: the compiled kernels are not available ({reason()}); the fp32 sampler uses ATen's kernels, "
        "about 1.5x slower on the CPU (langevin.kernels: aten silences this)",
        file=sys.stderr,
    )


def reset() -> None:
    """Forget the loaded library, so the next ``load()`` tries again (tests change ``$CC``)."""
    with _lock:
        _state.clear()
