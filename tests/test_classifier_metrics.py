"""evaluate.classifier_metrics on a classifier whose features and labels are read off the images.

Three sets of known, different feature distributions (samples, held-out test digits, training
digits) make every pairing give another distance, so a metric computed from the wrong pair, a
floor from the wrong sets, or a wrong share or histogram, fails.
"""

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.evaluate import classifier_metrics, draw_per_class, grey_share, normalised_entropy, saturate_to
from pipeline.fid import fid_from_features


class PixelClassifier(nn.Module):
    """Features: an image's first four pixels; logits: pixel 3's value at the class in pixel 2, 0 elsewhere."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4]

    def out(self, features: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(features.shape[0], 10, dtype=features.dtype)
        logits[torch.arange(features.shape[0]), features[:, 2].long()] = features[:, 3]
        return logits


def _images(n: int, mean: float, classes: list[int], strengths: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, 32, 32)
    flat = x.view(n, -1)
    flat[:, :2] = mean + torch.randn(n, 2, generator=g)  # the two features whose distribution differs by set
    flat[:, 2] = torch.tensor(classes, dtype=torch.float32)
    flat[:, 3] = torch.tensor(strengths, dtype=torch.float32)
    return x


def _sets(n_samples=50, n_test=50, n_train=50):
    # samples: digits 0-4, ten each; the first 30 labelled with logit 10 (p = 0.9996), the rest with 1 (p = 0.23)
    samples = _images(n_samples, 3.0, [i % 5 for i in range(n_samples)], [10.0] * 30 + [1.0] * (n_samples - 30), 1)
    # held-out digits: the first 20 labelled with logit 5 (p = 0.94), the rest with 1; training digits: 25 with 5
    test = _images(n_test, 0.0, [i % 10 for i in range(n_test)], [5.0] * 20 + [1.0] * (n_test - 20), 2)
    train = _images(n_train, 0.5, [i % 10 for i in range(n_train)], [5.0] * 25 + [1.0] * (n_train - 25), 3)
    return samples, test, train


def _features(x: torch.Tensor) -> np.ndarray:
    return x.flatten(1)[:, :4].double().numpy()


def test_fid_floor_confidence_and_coverage_come_from_the_right_sets():
    samples, test, train = _sets()
    metrics, per_digit = classifier_metrics(
        PixelClassifier(), samples, test, train, torch.device("cpu"), 0.9, torch.Generator().manual_seed(0)
    )
    f_samples, f_test, f_train = _features(samples), _features(test), _features(train)
    # Equal sizes: the random subsets are permutations of whole sets, and the distance ignores order.
    fid, floor = fid_from_features(f_samples, f_test), fid_from_features(f_train, f_test)
    wrong = {
        "samples vs train": fid_from_features(f_samples, f_train),
        "train vs test, for fid": floor,
        "test vs test": fid_from_features(f_test, f_test),
    }
    assert all(abs(fid - v) > 1.0 for v in wrong.values()) and abs(floor - wrong["samples vs train"]) > 1.0
    assert metrics["fid"] == pytest.approx(fid, rel=1e-9)
    assert metrics["fid_real_floor"] == pytest.approx(floor, rel=1e-9)
    assert metrics["fid_n"] == 50.0
    assert metrics["confident_share"] == pytest.approx(30 / 50)
    assert metrics["confident_share_real"] == pytest.approx(20 / 50)  # the ceiling, from the held-out digits
    assert per_digit.tolist() == [10, 10, 10, 10, 10, 0, 0, 0, 0, 0]
    assert metrics["coverage_entropy"] == pytest.approx(np.log(5) / np.log(10))
    assert metrics["coverage_entropy"] == pytest.approx(normalised_entropy(np.arange(50) % 5))


def test_confidence_threshold_and_the_common_size_of_unequal_sets():
    samples, test, train = _sets(n_samples=50, n_test=60, n_train=80)
    device, model = torch.device("cpu"), PixelClassifier()
    strict, _ = classifier_metrics(model, samples, test, train, device, 0.9, torch.Generator().manual_seed(0))
    loose, _ = classifier_metrics(model, samples, test, train, device, 0.2, torch.Generator().manual_seed(0))
    assert strict["fid_n"] == loose["fid_n"] == 50.0  # the smallest set's size
    assert strict["confident_share"] == pytest.approx(0.6) and loose["confident_share"] == pytest.approx(1.0)
    assert strict["fid"] == loose["fid"]  # the same generator, the same subsets
    # a subset of 50 from each real set: still far from the samples, still near each other
    assert strict["fid"] > 10 * strict["fid_real_floor"]


def test_grey_share_counts_the_pixels_between_ink_and_background():
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5, -0.95, 0.89, -0.9, 0.9]).view(1, 1, 2, 4)
    assert grey_share(x) == pytest.approx(3 / 8)  # 0, 0.5 and 0.89; +-0.9 and beyond count as ink or background


def test_saturate_to_raises_the_contrast_until_the_grey_share_is_the_target():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1  # grey share 0.9
    for target in (0.5, 0.2, 0.05):
        saturated, contrast = saturate_to(real, target)
        assert contrast > 1.0
        assert grey_share(saturated) == pytest.approx(target, abs=2 / real.numel())
        assert torch.equal(saturated, (real * contrast).clamp(-1, 1))
        assert torch.equal(saturated.sign(), real.sign())  # same strokes, only harder edges
    same, contrast = saturate_to(real, 0.95)  # already fewer grey pixels than the target: unchanged
    assert contrast == 1.0 and torch.equal(same, real)


def test_the_saturated_floor_is_the_floor_of_real_digits_as_grey_as_the_samples():
    samples, test, train = _sets()
    for x, shift in ((samples, 0.0), (test, 0.1), (train, 0.2)):  # soft pixels everywhere but the features
        x.view(len(x), -1)[:, 4:] = torch.linspace(-0.99, 0.99, 1020) + shift
    x = samples.view(len(samples), -1)
    x[:, 4:] = x[:, 4:].sign()  # the samples' background and ink saturated: grey share 0
    metrics, _ = classifier_metrics(
        PixelClassifier(), samples, test, train, torch.device("cpu"), 0.9, torch.Generator().manual_seed(0)
    )
    assert metrics["grey_share"] == pytest.approx(grey_share(samples)) and metrics["grey_share"] < 0.01
    assert metrics["grey_share_real"] == pytest.approx(grey_share(test)) and metrics["grey_share_real"] > 0.9
    saturated, contrast = saturate_to(train, grey_share(samples))
    assert metrics["saturation_contrast"] == pytest.approx(contrast) and contrast > 1.0
    expected = fid_from_features(_features(saturated), _features(test))
    assert metrics["fid_real_saturated"] == pytest.approx(expected, rel=1e-9)
    assert abs(metrics["fid_real_saturated"] - metrics["fid_real_floor"]) > 1.0  # the features saturated too

    grey_samples, _, _ = _sets()  # samples as grey as the real digits: the saturated floor is the floor
    metrics, _ = classifier_metrics(
        PixelClassifier(), grey_samples, test, train, torch.device("cpu"), 0.9, torch.Generator().manual_seed(0)
    )
    assert metrics["saturation_contrast"] == 1.0
    assert metrics["fid_real_saturated"] == pytest.approx(metrics["fid_real_floor"], rel=1e-12)


def _by_class(classes: list[int], offset: float, strength: float) -> torch.Tensor:
    """Images whose features depend on their class only (plus ``offset``, a shape error): any draw of a class
    gives the same features, so a mix of digits has one exact feature set."""
    x = torch.zeros(len(classes), 1, 32, 32)
    flat = x.view(len(classes), -1)
    c = torch.tensor(classes, dtype=torch.float32)
    flat[:, 0], flat[:, 1], flat[:, 2], flat[:, 3] = c + offset, (c - 4.5) ** 2 / 5, c, strength
    return x


def test_the_mix_of_digits_metrics_draw_real_digits_in_the_samples_proportions_and_even_out_the_samples():
    counts = np.array([12, 3, 0, 9, 6, 0, 0, 2, 4, 4])  # 40 samples, uneven, digits 2, 5 and 6 missing
    samples = _by_class([d for d, c in enumerate(counts) for _ in range(c)], 0.5, 10.0)
    test = _by_class([i % 10 for i in range(40)], 0.0, 10.0)
    train = _by_class([i % 10 for i in range(60)], 0.0, 10.0)  # six of each: digit 0 needs replacement
    metrics, per_digit = classifier_metrics(
        PixelClassifier(), samples, test, train, torch.device("cpu"), 0.9, torch.Generator().manual_seed(0)
    )
    assert per_digit.tolist() == counts.tolist()
    f_test = _features(test)
    real_in_their_mix = _features(_by_class([d for d, c in enumerate(counts) for _ in range(c)], 0.0, 10.0))
    assert metrics["fid_real_mix"] == pytest.approx(fid_from_features(real_in_their_mix, f_test), rel=1e-9)
    present = [d for d in range(10) if counts[d] > 0]
    samples_even = _features(_by_class([d for d in present for _ in range(4)], 0.5, 10.0))  # 40 // 10 each
    assert metrics["fid_even_mix"] == pytest.approx(fid_from_features(samples_even, f_test), rel=1e-9)
    # the mix alone costs FID; taking it out of the samples leaves the shape error (and the missing digits)
    assert metrics["fid_real_mix"] > 1.0 and metrics["fid_even_mix"] < metrics["fid"]


def test_draw_per_class_takes_the_counts_from_each_class():
    labels = np.array([0, 1, 1, 1, 2, 2, 3])
    picked = draw_per_class(labels, np.array([3, 2, 0, 1, 5]), torch.Generator().manual_seed(0))
    chosen = labels[picked.numpy()]
    assert np.bincount(chosen, minlength=5).tolist() == [3, 2, 0, 1, 0]  # class 4 has no items: none drawn
    assert len(set(picked[chosen == 1].tolist())) == 2  # enough items: no repeats
    assert set(picked[chosen == 0].tolist()) == {0}  # one item, drawn three times
