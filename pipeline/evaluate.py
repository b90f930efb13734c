"""Metrics of a trained energy model: energy separation, FID, classifier confidence and coverage."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.classifier import DigitClassifier, predict
from pipeline.fid import fid_from_features


@torch.no_grad()
def score_images(model: torch.nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1000):
    model.eval()
    return np.concatenate(
        [model(images[i : i + batch_size].to(device)).double().cpu().numpy() for i in range(0, len(images), batch_size)]
    )


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U / (n_pos n_neg)).

    For each positive, the negatives below it count 1 and those equal to it 1/2: two binary
    searches in the sorted negatives (no scipy.stats, which takes seconds to import).
    """
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.sort(np.asarray(negative, dtype=np.float64))
    below = np.searchsorted(neg, pos, side="left")
    not_above = np.searchsorted(neg, pos, side="right")
    return float((below + not_above).sum() / (2 * len(pos) * len(neg)))


def acceptance_threshold(real: np.ndarray, accept_share: float) -> float:
    """The largest score that at least ``accept_share`` of ``real`` reach: score >= it reads "a digit"."""
    ordered = np.sort(real)
    rejected = int(np.floor((1 - accept_share) * len(ordered) + 1e-9))  # + 1e-9: (1 - 0.9) * 10 is 0.999...
    return float(ordered[rejected])


def energy_separation(real: np.ndarray, noise: np.ndarray, samples: np.ndarray) -> dict[str, float]:
    return {
        "score_real": float(real.mean()),
        "score_noise": float(noise.mean()),
        "score_samples": float(samples.mean()),
        "score_gap_real_noise": float(real.mean() - noise.mean()),
        "auc_real_vs_noise": roc_auc(real, noise),
    }


def normalised_entropy(labels: np.ndarray, n_classes: int = 10) -> float:
    """Entropy of the predicted-class histogram divided by log(n_classes): 1 = all digits equally often."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / np.log(n_classes))


GREY_LEVEL = 0.9  # |pixel| below this is neither full ink (1) nor background (-1): a grey, anti-aliased pixel


def grey_share(images: torch.Tensor) -> float:
    """Share of pixels strictly between background and full ink (|x| < 0.9): the soft edges of real strokes."""
    return float((images.abs() < GREY_LEVEL).double().mean())


def saturate_to(images: torch.Tensor, target_grey: float) -> tuple[torch.Tensor, float]:
    """``images`` with contrast raised until their grey share falls to ``target_grey``; and that contrast.

    clamp(a x, -1, 1) keeps a pixel grey when |x| < 0.9 / a, so the contrast a comes from a quantile of |x|
    directly. A target at or above the images' own grey share leaves them unchanged (a = 1).
    """
    if target_grey >= grey_share(images):
        return images, 1.0
    edge = float(np.quantile(images.abs().double().cpu().numpy(), target_grey))  # the largest |x| left grey
    contrast = GREY_LEVEL / max(edge, 1e-6)
    return (images * contrast).clamp(-1.0, 1.0), contrast


def draw_per_class(labels: np.ndarray, counts: np.ndarray, generator: torch.Generator) -> torch.Tensor:
    """Indices into ``labels``: ``counts[d]`` of the items labelled ``d`` for every class ``d`` (without
    replacement where there are enough, with replacement where there are fewer; none where there are none)."""
    picked = []
    for digit, count in enumerate(counts.tolist()):
        pool = torch.from_numpy(np.flatnonzero(labels == digit))
        if count == 0 or len(pool) == 0:
            continue
        if len(pool) >= count:
            picked.append(pool[torch.randperm(len(pool), generator=generator)[:count]])
        else:
            picked.append(pool[torch.randint(len(pool), (count,), generator=generator)])
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)


def classifier_metrics(
    classifier: DigitClassifier,
    samples: torch.Tensor,
    real_test: torch.Tensor,
    real_train: torch.Tensor,
    device: torch.device,
    confidence: float,
    generator: torch.Generator,
) -> tuple[dict[str, float], np.ndarray]:
    """FID (samples vs test) beside its real-vs-real floor (train subset vs test, same N), confidence, coverage.

    ``confident_share_real`` is the confident share of the held-out digits themselves: the ceiling
    that ``confident_share`` of the samples can reach with this classifier.

    ``grey_share`` (and ``grey_share_real``, the held-out digits') is the share of grey pixels, the soft
    edges of the strokes. Long Langevin chains lose them: the strokes saturate to full ink. The FID's
    features notice this much more than the classifier's labels do, so ``fid_real_saturated`` gives the FID
    of the same real training digits as the floor, their contrast raised until their grey share is the
    samples' (``saturation_contrast``): the part of ``fid`` that saturation alone explains; the rest is shape
    and the mix of digits. With as many grey pixels as real digits, it is the floor. Pixel noise counts as
    grey too: for samples with a grainy background (``generate.final_steps``) both describe the noise, not edges.

    The features cluster by digit, so the proportions of the ten digits move their mean, and the FID, more than
    any stroke does. ``fid_real_mix`` is the FID of real training digits drawn in the samples' proportions
    (digits as the classifier labels them, samples and training digits alike): the part of ``fid`` the mix of
    digits alone explains. ``fid_even_mix`` is the samples' own FID with the mix taken out: the samples
    resampled to ``n // 10`` of every digit they contain (with replacement for the rarer ones).
    """
    n = min(len(samples), len(real_test), len(real_train))
    test_idx = torch.randperm(len(real_test), generator=generator)[:n]
    train_idx = torch.randperm(len(real_train), generator=generator)[:n]
    f_samples, p_samples = predict(classifier, samples[:n], device)
    f_test, p_test = predict(classifier, real_test[test_idx], device)
    f_train, _ = predict(classifier, real_train[train_idx], device)
    labels = p_samples.argmax(1).numpy()
    grey = grey_share(samples[:n])
    saturated, contrast = saturate_to(real_train[train_idx], grey)
    f_saturated, _ = predict(classifier, saturated, device)
    metrics = {
        "fid": fid_from_features(f_samples.numpy(), f_test.numpy()),
        "fid_real_floor": fid_from_features(f_train.numpy(), f_test.numpy()),
        "fid_n": float(n),
        "confident_share": float((p_samples.max(1).values > confidence).double().mean()),
        "confident_share_real": float((p_test.max(1).values > confidence).double().mean()),
        "coverage_entropy": normalised_entropy(labels),
        "grey_share": grey,
        "grey_share_real": grey_share(real_test[test_idx]),
        "fid_real_saturated": fid_from_features(f_saturated.numpy(), f_test.numpy()),
        "saturation_contrast": contrast,
    }
    per_digit = np.bincount(labels, minlength=10)
    f_train_all, p_train_all = predict(classifier, real_train, device)
    mixed = draw_per_class(p_train_all.argmax(1).numpy(), per_digit, generator)
    even = draw_per_class(labels, np.where(per_digit > 0, n // 10, 0), generator)
    metrics["fid_real_mix"] = fid_from_features(f_train_all.numpy()[mixed.numpy()], f_test.numpy())
    metrics["fid_even_mix"] = fid_from_features(f_samples.numpy()[even.numpy()], f_test.numpy())
    return metrics, per_digit
