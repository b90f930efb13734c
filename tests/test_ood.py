"""Out-of-distribution cases: their shape, range and seeding, and AUCs on a hand-built energy."""

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.config import OOD_CASES, OodConfig
from pipeline.evaluate import acceptance_threshold, roc_auc
from pipeline.ood import case_metrics, make_case, make_cases

RANDOM_CASES = {"uniform", "gaussian", "noisy", "shuffle", "blend"}  # the others are fixed transforms


def held_out(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Digit-like images: background -1 with a bright off-centre stroke, labels cycling over 0-9."""
    g = torch.Generator().manual_seed(0)
    images = torch.full((n, 1, 32, 32), -1.0)
    for i in range(n):
        row, col = 6 + i % 7, 5 + i % 9
        images[i, 0, row : row + 14, col : col + 3] = torch.rand(14, 3, generator=g) * 0.5 + 0.5
        images[i, 0, row, col : col + 10] = 1.0
    return images, torch.arange(n) % 10


def test_every_case_has_its_shape_and_range_and_is_made_from_its_seed():
    images, labels = held_out()
    cfg = OodConfig(n_noise=17)
    cases = make_cases(images, labels, cfg)
    assert list(cases) == list(OOD_CASES)
    expected_n = {
        "uniform": 17,
        "gaussian": 17,
        "flip": int((~torch.isin(labels, torch.tensor(cfg.flip_exclude))).sum()),
        "rotate": int((~torch.isin(labels, torch.tensor(cfg.rotate_exclude))).sum()),
    }
    again = make_cases(images, labels, cfg)
    reordered = make_cases(images, labels, dataclasses.replace(cfg, cases=tuple(reversed(OOD_CASES))))
    other_seed = make_cases(images, labels, dataclasses.replace(cfg, seed=1))
    for name, x in cases.items():
        assert x.shape == (expected_n.get(name, len(images)), 1, 32, 32), name
        assert x.dtype == torch.float32 and x.min() >= -1.0 and x.max() <= 1.0, name
        assert torch.equal(x, again[name]) and torch.equal(x, reordered[name]), name
        assert torch.equal(x, other_seed[name]) != (name in RANDOM_CASES), name
    assert cases["flip"].shape[0] < len(images) and cases["rotate"].shape[0] < len(images)


def test_cases_are_the_transforms_they_name():
    images, labels = held_out()
    cfg = OodConfig(flip_exclude=(0, 1, 8), rotate_exclude=(0,))
    keep = ~torch.isin(labels, torch.tensor([0, 1, 8]))
    assert torch.equal(make_case("flip", images, labels, cfg), images[keep].flip(-1))
    assert torch.equal(make_case("rotate", images, labels, cfg), torch.rot90(images[labels != 0], 1, (-2, -1)))
    assert torch.equal(make_case("invert", images, labels, cfg), -images)
    small = make_case("shrink", images, labels, cfg)  # half size, centred: a background border of 8 pixels
    assert (small[..., :8, :] == -1).all() and (small[..., 24:, :] == -1).all() and (small[..., :, :8] == -1).all()
    assert torch.allclose(small[..., 8:24, 8:24], torch.nn.functional.avg_pool2d(images, 2))
    shuffled = make_case("shuffle", images, labels, cfg)  # the same intensities in another order
    assert torch.equal(shuffled.flatten(1).sort(1).values, images.flatten(1).sort(1).values)
    assert not torch.equal(shuffled, images)
    blended = make_case("blend", images, labels, cfg)
    for i in range(len(images)):  # half this digit, half one of another class
        partner = (blended[i] - 0.5 * images[i]) / 0.5
        match = [j for j in range(len(images)) if torch.allclose(partner, images[j], atol=1e-6)]
        assert match and all(labels[j] != labels[i] for j in match)


def test_a_hand_built_energy_separates_what_it_must():
    """s(x) = -|x - ref|^2 with every held-out image equal to ref: every case that changes the image
    scores lower (AUC 1.0); a blend of two copies of ref is ref itself (AUC 0.5, all ties)."""
    images, labels = held_out(30)
    ref = images[3:4]
    real_images = ref.expand(30, -1, -1, -1).clone()

    def score(x: torch.Tensor) -> np.ndarray:
        return (-((x - ref) ** 2).sum(dim=(1, 2, 3))).double().numpy()

    cfg = OodConfig(n_noise=25, flip_exclude=(), rotate_exclude=())
    cases = make_cases(real_images, labels, cfg)
    real = score(real_images)
    threshold = acceptance_threshold(real, 0.95)
    metrics = case_metrics(real, {name: score(x) for name, x in cases.items()}, threshold)
    for name in OOD_CASES:
        expected = 0.5 if name == "blend" else 1.0
        assert metrics[f"ood_auc_{name}"] == expected, name
        assert metrics[f"ood_accepted_{name}"] == (1.0 if name == "blend" else 0.0), name
    assert metrics["ood_accepted_real"] == 1.0


def test_auc_orientation_and_the_acceptance_threshold():
    rng = np.random.default_rng(0)
    real = rng.normal(size=1000)
    assert roc_auc(real, real - 10) == 1.0 and roc_auc(real, real + 10) == 0.0
    threshold = acceptance_threshold(real, 0.95)
    assert (real >= threshold).mean() == 0.95  # at least the share, and the largest such threshold
    assert (real >= np.nextafter(threshold, np.inf)).mean() < 0.95
    assert (np.arange(10.0) >= acceptance_threshold(np.arange(10.0), 0.9)).mean() == 0.9


def test_a_case_left_empty_by_its_exclusions_is_one_line():
    from pipeline.data import DataError

    images, _ = held_out(6)
    with pytest.raises(DataError, match="flip case is empty"):
        make_case("flip", images, torch.tensor([0, 1, 8, 0, 1, 8]), OodConfig())
