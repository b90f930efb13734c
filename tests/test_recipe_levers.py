"""The recipe's levers beyond the book: learning-rate schedule, an EMA of the weights, spectral normalisation, the generation step size."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pipeline.buffer import uniform_noise
from pipeline.config import ConfigError, parse_params
from pipeline.generate import generate_samples
from pipeline.langevin import langevin
from pipeline.model import IMAGE_SHAPE, EnergyNet
from pipeline.train import Trainer, TrainingInterrupted, cd_step
from pipeline.tracking import NullTracker
from tests.conftest import tiny_params_dict


def _trainer(tmp_path, step_fn=cd_step, name="ckpt.pt", **train):
    raw = tiny_params_dict({"train": {"epochs": 3, "checkpoint_every": 2, **train}, "tracking": {"enabled": False}})
    images = torch.linspace(-1, 1, 48 * 1024).reshape(48, 1, 32, 32)
    return Trainer(
        parse_params(raw), images, torch.device("cpu"), NullTracker(), tmp_path / name, progress=False, step_fn=step_fn
    )


def test_cosine_schedule_runs_from_lr_to_the_final_factor(tmp_path):
    tr = _trainer(tmp_path, lr=2e-4, lr_schedule="cosine", lr_final_factor=0.1, epochs=10)
    n = tr.total_steps
    lrs = [tr.lr_at(s) for s in range(n)]
    assert lrs[0] == pytest.approx(2e-4)
    assert lrs[-1] == pytest.approx(2e-5)
    assert lrs[(n - 1) // 2] == pytest.approx(2e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * ((n - 1) // 2) / (n - 1)))))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    tr.lr_scale = 0.5  # after a rollback the whole schedule is lowered
    assert tr.lr_at(0) == pytest.approx(1e-4)
    constant = _trainer(tmp_path, lr=3e-4, lr_schedule="constant")
    assert {constant.lr_at(s) for s in range(constant.total_steps)} == {3e-4}


def test_optimizer_follows_the_schedule_during_fit(tmp_path):
    seen = []

    def step_fn(model, optimizer, *args, **kwargs):
        seen.append(optimizer.param_groups[0]["lr"])
        return cd_step(model, optimizer, *args, **kwargs)

    tr = _trainer(tmp_path, step_fn=step_fn, lr_schedule="cosine", lr_final_factor=0.25)
    tr.fit()
    assert seen == pytest.approx([tr.lr_at(s) for s in range(tr.total_steps)])
    assert [row["step"] for row in tr.history] == [3, 6, 9]  # log_every 3 of 9 steps
    assert [row["lr"] for row in tr.history] == pytest.approx([seen[row["step"] - 1] for row in tr.history])


def test_ema_is_the_warmed_up_moving_average_and_what_fit_returns(tmp_path):
    weights = []

    def step_fn(model, optimizer, *args, **kwargs):
        stats = cd_step(model, optimizer, *args, **kwargs)
        weights.append([p.detach().clone() for p in model.parameters()])
        return stats

    tr = _trainer(tmp_path, step_fn=step_fn, ema_decay=0.9)
    initial = [p.detach().clone() for p in tr.model.parameters()]
    result = tr.fit()
    expected = initial
    for step, current in enumerate(weights):
        d = min(0.9, (1 + step) / (10 + step))
        expected = [d * e + (1 - d) * w for e, w in zip(expected, current)]
    assert result.model is tr.ema is tr.sampling_model()
    for got, want, live in zip(tr.ema.parameters(), expected, tr.model.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(e, w) for e, w in zip(tr.ema.parameters(), tr.model.parameters()))
    assert not any(p.requires_grad for p in tr.ema.parameters())
    off = _trainer(tmp_path, name="off.pt", ema_decay=0.0)
    assert off.ema is None and off.sampling_model() is off.model


def test_ema_survives_an_interruption_and_resume_exactly(tmp_path):
    reference = _trainer(tmp_path, name="ref.pt", ema_decay=0.8)
    reference.fit()

    def stop_at_3(model, optimizer, *args, **kwargs):
        if interrupted.step == 3:
            interrupted._signal = 15
        return cd_step(model, optimizer, *args, **kwargs)

    interrupted = _trainer(tmp_path, step_fn=stop_at_3, name="run.pt", ema_decay=0.8)
    with pytest.raises(TrainingInterrupted):
        interrupted.fit()
    resumed = _trainer(tmp_path, name="run.pt", ema_decay=0.8)
    assert resumed.try_resume() and resumed.step == 4
    resumed.fit()
    for a, b in zip(resumed.ema.parameters(), reference.ema.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "key, value",
    [("lr_schedule", "step"), ("spectral_norm", "yes"), ("lr_final_factor", 0.0), ("lr_final_factor", 1.5), ("ema_decay", 1.0), ("ema_decay", -0.1)],
)
def test_bad_lever_values_are_one_line_errors(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}="):
        parse_params(tiny_params_dict({"train": {key: value}}))


def test_generation_uses_its_own_step_size_and_the_sampler_section_for_the_rest():
    params = parse_params(
        tiny_params_dict(
            {
                "langevin": {"step_size": 10.0, "noise": 0.02, "grad_clip": 0.05, "precision": "fp32", "workers": 1},
                "generate": {  # one phase: the hot end is the next test's
                    "step_size": 3.0, "n_samples": 6, "batch_size": 6, "steps": 4, "chain_steps": [0, 3], "final_steps": 0,
                },
            }
        )
    )
    torch.manual_seed(0)
    model = EnergyNet.from_config(params.model)
    samples, snapshots = generate_samples(model, params.generate, params.langevin, torch.device("cpu"), progress=False)

    generator = torch.Generator().manual_seed(params.generate.seed)
    x0 = uniform_noise(6, IMAGE_SHAPE, device="cpu", generator=generator)
    expected, _ = langevin(model, x0, steps=4, step_size=3.0, noise=0.02, grad_clip=0.05, generator=generator)
    torch.testing.assert_close(samples, expected)
    torch.testing.assert_close(snapshots[3], expected[: params.generate.chain_rows])

    generator = torch.Generator().manual_seed(params.generate.seed)
    x0 = uniform_noise(6, IMAGE_SHAPE, device="cpu", generator=generator)
    training_steps, _ = langevin(model, x0, steps=4, step_size=10.0, noise=0.02, grad_clip=0.05, generator=generator)
    assert not torch.allclose(samples, training_steps)


def test_a_hot_end_runs_the_last_generation_steps_with_its_own_noise():
    params = parse_params(
        tiny_params_dict(
            {
                "langevin": {"step_size": 10.0, "noise": 0.02, "grad_clip": 0.05, "precision": "fp32", "workers": 1},
                "generate": {"step_size": 3.0, "n_samples": 6, "batch_size": 3, "steps": 5, "chain_rows": 2,
                             "chain_steps": [0, 2, 3, 4], "final_steps": 2, "final_noise": 0.3},
            }
        )
    )
    torch.manual_seed(0)
    model = EnergyNet.from_config(params.model)
    samples, snapshots = generate_samples(model, params.generate, params.langevin, torch.device("cpu"), progress=False)

    generator = torch.Generator().manual_seed(params.generate.seed)
    expected = []
    for batch in range(2):
        x0 = uniform_noise(3, IMAGE_SHAPE, device="cpu", generator=generator)
        cool, cool_snaps = langevin(model, x0, steps=3, step_size=3.0, noise=0.02, grad_clip=0.05,
                                    generator=generator, record_at=[0, 2])
        hot, hot_snaps = langevin(model, cool, steps=2, step_size=3.0, noise=0.3, grad_clip=0.05,
                                  generator=generator, record_at=[0, 1])
        expected.append(hot)
        if batch == 0:  # the snapshots: the first chain_rows chains of the first batch, numbered over both phases
            for step, snap in {0: cool_snaps[0], 2: cool_snaps[2], 3: hot_snaps[0], 4: hot_snaps[1]}.items():
                torch.testing.assert_close(snapshots[step], snap[:2])
    torch.testing.assert_close(samples, torch.cat(expected))
    assert sorted(snapshots) == [0, 2, 3, 4]
    torch.testing.assert_close(snapshots[4], samples[:2])

    cold = dataclasses.replace(params.generate, final_noise=0.02)  # the same noise throughout: one chain of 5 steps
    one_phase = dataclasses.replace(params.generate, final_steps=0)
    a, _ = generate_samples(model, cold, params.langevin, torch.device("cpu"), progress=False)
    b, _ = generate_samples(model, one_phase, params.langevin, torch.device("cpu"), progress=False)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("key, value", [("final_steps", -1), ("final_steps", 6), ("final_noise", -0.1)])
def test_bad_hot_end_values_are_one_line_errors(key, value):
    with pytest.raises(ConfigError, match=f"generate.{key}="):
        parse_params(tiny_params_dict({"generate": {"steps": 5, "chain_steps": [0, 4], key: value}}))


def _singular_values(model):
    return [
        torch.linalg.matrix_norm(layer.weight.flatten(1), ord=2).item()
        for layer in model.layers() if getattr(layer, "weight", None) is not None
    ]


def test_spectral_norm_keeps_every_weight_matrix_at_singular_value_one_through_training(tmp_path):
    seen = []

    def step_fn(model, optimizer, *args, **kwargs):
        seen.append(_singular_values(model))  # what the sampler of this step scores with
        return cd_step(model, optimizer, *args, **kwargs)

    tr = _trainer(tmp_path, step_fn=step_fn, spectral_norm=True, ema_decay=0.9)
    assert max(abs(v - 1) for v in _singular_values(EnergyNet())) > 0.05  # as built, not normalised
    tr.fit()
    assert len(seen) == tr.total_steps == 9
    for values in [*seen, _singular_values(tr.model)]:  # from the first step to the last update: all ones
        assert values == pytest.approx([1.0] * 6, abs=1e-5)
    assert all(v <= 1.0 + 1e-5 for v in _singular_values(tr.ema))  # an average of such matrices stays within
    assert type(tr.sampling_model()) is EnergyNet  # a plain network for generation and the saved model

