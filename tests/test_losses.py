import torch

from pipeline.buffer import ReplayBuffer
from pipeline.config import LangevinConfig, TrainConfig
from pipeline.losses import contrastive_divergence
from pipeline.model import EnergyNet
from pipeline.train import cd_step


def test_contrastive_divergence_values():
    real = torch.tensor([1.0, 3.0])
    fake = torch.tensor([-1.0, 0.0])
    loss, stats = contrastive_divergence(real, fake, alpha=0.1)
    assert torch.isclose(stats["cdiv"], torch.tensor(-0.5 - 2.0))
    assert torch.isclose(stats["reg"], torch.tensor(0.1 * (5.0 + 0.5)))
    assert torch.isclose(loss, stats["cdiv"] + stats["reg"])


def test_one_cd_step_moves_scores_in_the_right_directions():
    torch.manual_seed(0)
    model = EnergyNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    real = -torch.ones(32, 1, 32, 32)  # digit-like: dark background with a bright stroke
    real[:, :, 8:24, 14:18] = 1.0
    buffer = ReplayBuffer(64, (1, 32, 32), reinit_prob=1.0)  # fakes start from uniform noise
    langevin_cfg = LangevinConfig(steps=5)
    train_cfg = TrainConfig(batch_size=32, alpha=0.0, real_noise=0.0)

    stats = cd_step(model, optimizer, buffer, real, langevin_cfg=langevin_cfg, train_cfg=train_cfg, generator=g)
    fake = buffer.images()  # the Langevin samples the step was computed on
    assert fake.shape == (32, 1, 32, 32)
    with torch.no_grad():
        real_after, fake_after = model(real).mean(), model(fake).mean()
    # At initialisation the network is nearly constant, so one step shifts every score together;
    # what CD must do is raise the real scores and lower the fakes relative to them.
    real_change = real_after - stats["real_score"]
    fake_change = fake_after - stats["fake_score"]
    assert real_change > 0
    assert fake_change < real_change
    assert (fake_after - real_after) < stats["cdiv"]  # the contrastive loss on this batch went down
    assert set(stats) >= {"loss", "cdiv", "reg", "real_score", "fake_score", "grad_norm"}


def test_short_batch_splits_by_count():
    """A batch of 5 reals gives 5 real and 5 fake scores, never a half split of something else."""
    torch.manual_seed(0)
    model = EnergyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    buffer = ReplayBuffer(16, (1, 32, 32), reinit_prob=0.0)
    real = torch.rand(5, 1, 32, 32) * 2 - 1
    stats = cd_step(
        model, optimizer, buffer, real,
        langevin_cfg=LangevinConfig(steps=1), train_cfg=TrainConfig(real_noise=0.0), generator=torch.Generator(),
    )
    with torch.no_grad():
        expected_real = model(real).mean()
    assert torch.isclose(stats["real_score"], expected_real, atol=1e-6)
    assert len(buffer) == 5
