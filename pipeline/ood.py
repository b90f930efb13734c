"""Out-of-distribution sets made from held-out digits or drawn fresh, and how the energy ranks them.

Each case is a set of images that are not digits of the training distribution, in the model's
space ((N, 1, 32, 32) float32 in [-1, 1]). Noise cases are drawn fresh; the others transform the
held-out digits. Every case draws from its own generator, seeded from ``ood.seed`` and the case's
name, so a case is the same whichever other cases run and in whatever order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import OodConfig
from pipeline.data import BACKGROUND, DataError
from pipeline.evaluate import roc_auc
from pipeline.model import IMAGE_SHAPE
from pipeline.runtime import named_seed

DESCRIPTIONS = {  # one line per case, for tables and figures
    "uniform": "uniform noise in [-1, 1]",
    "gaussian": "Gaussian noise images, clamped",
    "noisy": "digits + Gaussian noise, clamped",
    "flip": "digits mirrored left-right",
    "rotate": "digits rotated by 90 degrees",
    "invert": "inverted digits (-x)",
    "shrink": "digits shrunk and centred",
    "shuffle": "digits with their pixels shuffled",
    "blend": "blend of two digits of different classes",
}


def case_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator for one case, seeded from ``seed`` and the case's name."""
    return torch.Generator().manual_seed(named_seed(seed, name))


def _without(images: torch.Tensor, labels: torch.Tensor, digits: tuple[int, ...], case: str) -> torch.Tensor:
    keep = ~torch.isin(labels, torch.tensor(digits, dtype=labels.dtype))
    if not keep.any():
        raise DataError(f"ood: the {case} case is empty: every held-out digit is one of {list(digits)}")
    return images[keep]


def shrink(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Images scaled by ``factor`` (area averaging) and centred on the background."""
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="area")
    top, left = (h - small.shape[-2]) // 2, (w - small.shape[-1]) // 2
    pad = (left, w - small.shape[-1] - left, top, h - small.shape[-2] - top)
    return F.pad(small, pad, value=BACKGROUND)


def shuffle_pixels(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image's pixels in a random order of its own: the same intensities, no shape."""
    flat = images.flatten(1)  # (N, H*W)
    order = torch.argsort(torch.rand(flat.shape, generator=generator), dim=1)
    return flat.gather(1, order).view_as(images)


def blend(images: torch.Tensor, labels: torch.Tensor, weight: float, generator: torch.Generator) -> torch.Tensor:
    """``weight`` x each digit + (1 - weight) x a held-out digit of another class, drawn at random."""
    partner = torch.empty(len(labels), dtype=torch.long)
    for digit in labels.unique():
        mine = (labels == digit).nonzero().squeeze(1)
        others = (labels != digit).nonzero().squeeze(1)
        if len(others) == 0:
            raise DataError("ood: the blend case needs held-out digits of at least two classes")
        partner[mine] = others[torch.randint(len(others), (len(mine),), generator=generator)]
    return weight * images + (1 - weight) * images[partner]


def make_case(name: str, images: torch.Tensor, labels: torch.Tensor, cfg: OodConfig) -> torch.Tensor:
    """The images of one case (CPU, (N, 1, 32, 32) in [-1, 1]) from the held-out ``images`` and ``labels``."""
    g = case_generator(cfg.seed, name)
    if name == "uniform":
        return torch.rand((cfg.n_noise, *IMAGE_SHAPE), generator=g) * 2 - 1
    if name == "gaussian":
        noise = torch.randn((cfg.n_noise, *IMAGE_SHAPE), generator=g)
        return (cfg.gaussian_mean + cfg.gaussian_std * noise).clamp(-1, 1)
    if name == "noisy":
        return (images + cfg.noisy_std * torch.randn(images.shape, generator=g)).clamp(-1, 1)
    if name == "flip":
        return _without(images, labels, cfg.flip_exclude, name).flip(-1)
    if name == "rotate":
        return torch.rot90(_without(images, labels, cfg.rotate_exclude, name), k=1, dims=(-2, -1))
    if name == "invert":
        return -images
    if name == "shrink":
        return shrink(images, cfg.shrink_factor)
    if name == "shuffle":
        return shuffle_pixels(images, g)
    if name == "blend":
        return blend(images, labels, cfg.blend_weight, g)
    raise ValueError(f"unknown OOD case {name!r}")  # config validation keeps users from here


def make_cases(images: torch.Tensor, labels: torch.Tensor, cfg: OodConfig) -> dict[str, torch.Tensor]:
    """Every case of ``cfg.cases``, in that order."""
    return {name: make_case(name, images, labels, cfg).contiguous() for name in cfg.cases}


def case_metrics(real: np.ndarray, cases: dict[str, np.ndarray], threshold: float) -> dict[str, float]:
    """Per case: ``ood_auc_<case>``, the ROC AUC of held-out digits (positive) against the case by score
    (1 = every digit scores above every case image, 0.5 = no better than chance, below 0.5 = the case
    scores higher than digits); ``ood_accepted_<case>``, the share of the case at or above the in/out
    ``threshold`` (taken for a digit); ``ood_score_<case>``, its mean score."""
    metrics = {"ood_score_real": float(real.mean()), "ood_accepted_real": float((real >= threshold).mean())}
    for name, scores in cases.items():
        metrics[f"ood_auc_{name}"] = roc_auc(real, scores)
        metrics[f"ood_accepted_{name}"] = float((scores >= threshold).mean())
        metrics[f"ood_score_{name}"] = float(scores.mean())
    return metrics


def markdown_table(metrics: dict[str, float], counts: dict[str, int], threshold: float) -> str:
    """The per-case table of ``case_metrics``, in markdown."""
    lines = [
        f"| case | images | AUC (digits vs case) | accepted at threshold {threshold:.4g} | mean score |",
        "|---|---|---|---|---|",
        f"| held-out digits | {counts['real']} | - | {metrics['ood_accepted_real']:.3f} "
        f"| {metrics['ood_score_real']:.3f} |",
    ]
    for name, n in counts.items():
        if name == "real":
            continue
        lines.append(
            f"| `{name}`: {DESCRIPTIONS[name]} | {n} | {metrics[f'ood_auc_{name}']:.3f} "
            f"| {metrics[f'ood_accepted_{name}']:.3f} | {metrics[f'ood_score_{name}']:.3f} |"
        )
    return "\n".join(lines) + "\n"
