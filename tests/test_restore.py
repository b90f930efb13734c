"""Restoration: the masked sampler keeps every known pixel bit for bit and raises the score; the damage."""

import dataclasses

import pytest
import torch

from pipeline.config import LangevinConfig, RestoreConfig
from pipeline.langevin import langevin, score_in_precision
from pipeline.model import EnergyNet, frozen
from pipeline.restore import damage, region_mask, restore


def _fixed_net() -> EnergyNet:
    torch.manual_seed(0)
    return EnergyNet().eval()


def _images(n: int = 12) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("score", ["autograd", "sampler copy"])
def test_masked_sampler_keeps_known_pixels_and_raises_the_score(workers, score):
    model = _fixed_net()
    # the model itself (autograd's gradient) or the sampler's fp32 copy (its gradient without autograd)
    score_fn = model if score == "autograd" else score_in_precision(model, "fp32")
    x0 = _images()
    mask = region_mask(x0.shape, "bottom", 0)
    with frozen(model):
        x, snaps = langevin(
            score_fn, x0, steps=20, step_size=10.0, noise=0.005, grad_clip=0.03,
            generator=torch.Generator().manual_seed(1), mask=mask, workers=workers, record_at=[0, 19],
        )
        before, after = model(x0).mean().item(), model(x).mean().item()
    assert torch.equal(x[~mask], x0[~mask])
    assert torch.equal(snaps[0][~mask], x0[~mask])
    assert not torch.equal(x[mask], x0[mask])
    assert after > before
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_a_mask_of_every_pixel_is_the_unmasked_sampler_and_a_broadcast_mask_works():
    model = _fixed_net()
    x0 = _images(6)
    kw = {"steps": 4, "step_size": 10.0, "noise": 0.01, "grad_clip": 0.03}
    with frozen(model):
        free, _ = langevin(model, x0, generator=torch.Generator().manual_seed(2), **kw)
        all_free, _ = langevin(
            model, x0, generator=torch.Generator().manual_seed(2), mask=torch.ones(1, 1, 32, 32, dtype=torch.bool), **kw
        )
        half = torch.zeros(32, 32, dtype=torch.bool)
        half[:, 16:] = True  # one (H, W) mask for every image
        x, _ = langevin(model, x0, generator=torch.Generator().manual_seed(2), mask=half, workers=2, **kw)
    assert torch.equal(free, all_free)
    assert torch.equal(x[..., :16], x0[..., :16]) and not torch.equal(x[..., 16:], x0[..., 16:])
    with pytest.raises(TypeError, match="bool"):
        langevin(model, x0, mask=torch.ones(1, 1, 32, 32), **kw)


@pytest.mark.parametrize("region", ["top", "bottom", "left", "right", "box"])
def test_inpainting_damages_exactly_its_region(region):
    images = _images(4)
    cfg = RestoreConfig(inpaint_region=region, inpaint_box=10)
    damaged, mask = damage("inpaint", images, cfg, torch.Generator().manual_seed(0))
    assert mask.shape == images.shape and mask.dtype == torch.bool
    assert int(mask[0, 0].sum()) == (100 if region == "box" else 512)
    assert torch.equal(damaged[~mask], images[~mask]) and not torch.equal(damaged[mask], images[mask])
    assert damaged.min() >= -1 and damaged.max() <= 1
    again, _ = damage("inpaint", images, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(damaged, again)


def test_denoising_damage():
    images = torch.full((64, 1, 32, 32), -1.0)
    cfg = RestoreConfig(denoise_kind="salt_pepper", denoise_share=0.3)
    damaged, mask = damage("denoise", images, cfg, torch.Generator().manual_seed(0))
    assert abs(mask.float().mean().item() - 0.3) < 0.01
    assert set(damaged[mask].unique().tolist()) == {-1.0, 1.0} and torch.equal(damaged[~mask], images[~mask])
    cfg = dataclasses.replace(cfg, denoise_kind="gaussian", denoise_std=0.3)
    damaged, mask = damage("denoise", images, cfg, torch.Generator().manual_seed(0))
    assert mask.all() and damaged.min() >= -1 and damaged.max() <= 1
    assert abs((damaged - images).std().item() - 0.3 * 0.6) < 0.05  # half of N(0, 0.3^2) is clamped away at -1


def test_restore_moves_only_the_damaged_pixels_towards_a_higher_score():
    model = _fixed_net()
    images = _images(8)
    cfg = RestoreConfig(steps=15, step_size=10.0)
    damaged, mask = damage("inpaint", images, cfg, torch.Generator().manual_seed(0))
    with frozen(model):
        restored = restore(
            score_in_precision(model, "fp32"), damaged, mask, cfg, LangevinConfig(workers=1),
            torch.Generator().manual_seed(0),
        )
        assert model(restored).mean() > model(damaged).mean()
    assert torch.equal(restored[~mask], images[~mask])
