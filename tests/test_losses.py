import torch

from pipeline.buffer import ReplayBuffer
from pipeline.config import LangevinConfig, TrainConfig
from pipeline.losses import contrastive_divergence, sampler_kl
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


def _tiny_net(dtype=torch.float64) -> EnergyNet:
    torch.manual_seed(0)
    return EnergyNet(channels=(2, 2, 2, 2), hidden=4).to(dtype)


def test_sampler_kl_gradient_reaches_the_weights_only_through_the_step():
    """d KL / d weights is the derivative of -s_frozen(x + step * grad_x s_weights(x)): checked by
    finite differences on one weight; with a zero step the weights get no gradient at all."""
    model = _tiny_net()
    x = torch.rand(3, 1, 32, 32, dtype=torch.float64) * 1.6 - 0.8  # inside (-1, 1): no clamp kink
    step = 2.0

    def kl_with(weight_delta: float) -> float:
        """The loss with one weight moved in the step's network only; the frozen score keeps the original."""
        with torch.no_grad():
            stepped = _tiny_net()
            stepped.features[2].weight[0, 0, 1, 1] += weight_delta
        xi = x.clone().requires_grad_(True)
        grad = torch.autograd.grad(stepped(xi).sum(), xi)[0]
        with torch.no_grad():
            return float(-model((x + step * grad).clamp(-1, 1)).mean())

    loss, stats = sampler_kl(model, x, step_size=step, grad_clip=0.0)
    loss.backward()
    analytic = float(model.features[2].weight.grad[0, 0, 1, 1])
    eps = 1e-5
    numeric = (kl_with(eps) - kl_with(-eps)) / (2 * eps)
    assert abs(analytic) > 1e-8
    assert abs(analytic - numeric) <= 1e-5 * max(1.0, abs(numeric))
    assert torch.isclose(stats["kl"], loss.detach())
    assert all(p.requires_grad for p in model.parameters())  # the weights are live again afterwards

    model.zero_grad(set_to_none=True)
    still, _ = sampler_kl(model, x, step_size=0.0, grad_clip=0.0)
    still.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_sampler_kl_entropy_is_the_mean_log_nearest_distance():
    model = _tiny_net()
    x = torch.rand(4, 1, 32, 32, dtype=torch.float64) * 2 - 1
    compare = torch.rand(6, 1, 32, 32, dtype=torch.float64) * 2 - 1
    plain, _ = sampler_kl(model, x, step_size=1.0, grad_clip=0.03)
    loss, stats = sampler_kl(model, x, step_size=1.0, grad_clip=0.03, compare=compare, repel=0.3)
    xi = x.clone().requires_grad_(True)
    moved = (x + 1.0 * torch.autograd.grad(model(xi).sum(), xi)[0].clamp(-0.03, 0.03)).clamp(-1, 1)
    nearest = torch.stack([min(torch.linalg.vector_norm(m - c) for c in compare) for m in moved])
    assert torch.isclose(stats["repel_entropy"], nearest.log().mean())
    assert torch.isclose(loss.detach(), plain.detach() - 0.3 * nearest.log().mean())


def test_cd_step_with_the_kl_term_logs_it_and_changes_nothing_when_off():
    langevin_cfg = LangevinConfig(steps=2)
    real = torch.rand(16, 1, 32, 32) * 2 - 1

    def run(train_cfg: TrainConfig, steps: int = 2):
        torch.manual_seed(0)
        model = EnergyNet()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        buffer = ReplayBuffer(64, (1, 32, 32), reinit_prob=0.05)
        g = torch.Generator().manual_seed(0)
        stats = [cd_step(model, optimizer, buffer, real, langevin_cfg=langevin_cfg, train_cfg=train_cfg, generator=g)
                 for _ in range(steps)]
        return model, stats

    off, off_stats = run(TrainConfig(batch_size=16))
    again, _ = run(TrainConfig(batch_size=16, kl_chains=4, kl_compare=8))  # sizes alone change nothing
    on, on_stats = run(TrainConfig(batch_size=16, kl_weight=1.0, kl_repel=0.3, kl_chains=4, kl_compare=8))
    assert "kl" not in off_stats[-1]
    assert all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), again.state_dict().values()))
    assert "repel_entropy" not in on_stats[0]  # the first step has no earlier samples to compare with
    assert {"kl", "repel_entropy"} <= set(on_stats[-1])
    last = on_stats[-1]
    assert torch.isclose(last["loss"], last["cdiv"] + last["reg"] + last["kl"] - 0.3 * last["repel_entropy"], atol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(off.state_dict().values(), on.state_dict().values()))
