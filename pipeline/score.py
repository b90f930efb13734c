"""``python -m pipeline score FILE...``: the trained energy's score of your own images, and an in/out verdict.

Reads ``.npy`` arrays and ``.png`` images. An array holds one image or a stack: (32, 32), (1, 32, 32),
(N, 32, 32) or (N, 1, 32, 32), or the same with 28 x 28 MNIST digits, which are padded to 32 x 32
with the background as the prepare stage pads them. Values in [-1, 1] are taken as the model's
space (background -1, ink 1); otherwise values in [0, 255] are pixel intensities (0 = background).
A PNG is read as grey levels 0-255 and must be 28 x 28 or 32 x 32. Like MNIST, digits are light on
a dark background: a dark digit on white paper is an inverted digit, which the energy should reject.

Each image gets its score s(x) = -E(x) and ``in`` (a digit) when the score reaches the threshold
that ``evaluate`` stored with the model (``paths.threshold``), else ``out``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Params
from pipeline.data import BACKGROUND, PAD, DataError
from pipeline.evaluate import score_images
from pipeline.runtime import resolve_device
from pipeline.stages.common import load_energy_model, read_threshold


def _to_model_space(array: np.ndarray, name: str) -> torch.Tensor:
    """An image array (see the module doc) -> float32 (N, 1, 32, 32) in [-1, 1]."""
    shape = array.shape
    if array.ndim == 4 and shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] not in ((28, 28), (32, 32)) or array.shape[0] == 0:
        raise DataError(
            f"score: {name} holds an array of shape {shape}; expected N x 32 x 32, N x 1 x 32 x 32 or 28 x 28 images"
        )
    if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"score: {name} holds {array.dtype} values; expected numbers")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise DataError(f"score: {name} holds NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if array.dtype == np.uint8 or not (lo >= -1.0 and hi <= 1.0):
        if lo < 0.0 or hi > 255.0:
            raise DataError(f"score: {name} holds values in [{lo:.4g}, {hi:.4g}]; expected [-1, 1] or [0, 255]")
        values = values / 127.5 - 1.0
    elif lo >= 0.0:
        print(
            f"score: {name} holds values in [{lo:.4g}, {hi:.4g}], read as the model's [-1, 1] (background -1); "
            "multiply by 255 if they are intensities in [0, 1]",
            file=sys.stderr,
        )
    x = torch.from_numpy(values.astype(np.float32))  # (N, H, W)
    if x.shape[1] == 28:  # padded with the background, as the prepare stage pads MNIST (data.to_model_space)
        x = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD), value=BACKGROUND)
    return x.unsqueeze(1)


def read_images(path: str | Path) -> torch.Tensor:
    """The images of one ``.npy`` or ``.png`` file, in the model's space; a bad file is one ``DataError`` line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"score: {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - truncated, foreign or pickled file
            raise DataError(f"score: cannot read {path} as a .npy array ({type(exc).__name__})") from None
        return _to_model_space(np.asarray(array), str(path))
    if suffix == ".png":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                grey = np.asarray(image.convert("L"), dtype=np.uint8)  # alpha and colour dropped: luminance
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"score: cannot read {path} as a PNG image ({type(exc).__name__})") from None
        if grey.shape not in ((28, 28), (32, 32)):
            raise DataError(f"score: {path} is {grey.shape[1]} x {grey.shape[0]} pixels; expected 28 x 28 or 32 x 32")
        return _to_model_space(grey, str(path))
    raise DataError(f"score: {path} is neither .npy nor .png")


def main(params: Params, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline score", description=__doc__.splitlines()[0]
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help=".npy arrays or .png images")
    args = parser.parse_args(argv)
    model_path = Path(params.paths.model)
    if not model_path.is_file():
        raise DataError(f"score: {model_path} not found; run `dvc repro` (or `dvc pull`) first")
    threshold = read_threshold(params, "score")
    images = {name: read_images(name) for name in args.files}  # every file checked before any scoring
    device = resolve_device(params.runtime)
    model, _ = load_energy_model(model_path, device)
    print(f"threshold {threshold:.5f}: score >= threshold is `in` (a digit), from {params.paths.threshold}")
    print("file\timage\tscore\tverdict")
    for name, x in images.items():
        for i, score in enumerate(score_images(model, x, device)):
            print(f"{name}\t{i}\t{score:.5f}\t{'in' if score >= threshold else 'out'}")
    sys.stdout.flush()
    return 0
