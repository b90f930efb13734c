"""Snapshots of the sampling weights over the last iterations, and generation split over them."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml

from pipeline.buffer import uniform_noise
from pipeline.checkpoint import CheckpointError, safe_load, MODEL_FORMAT
from pipeline.config import ConfigError, parse_params
from pipeline.generate import generate_samples
from pipeline.langevin import langevin
from pipeline.model import IMAGE_SHAPE, EnergyNet
from pipeline.stages.common import load_snapshots
from pipeline.train import Trainer, TrainingInterrupted, cd_step
from pipeline.tracking import NullTracker
from tests.conftest import run, tiny_params_dict


def _trainer(tmp_path, step_fn=cd_step, name="ckpt.pt", **train):
    raw = tiny_params_dict({
        "train": {"epochs": 3, "checkpoint_every": 2, "ema_decay": 0.8, "snapshots": 3, "snapshot_every": 2, **train},
        "tracking": {"enabled": False},
        "generate": {"snapshots": 1},  # these trainers only train
    })
    images = torch.linspace(-1, 1, 48 * 1024).reshape(48, 1, 32, 32)
    return Trainer(
        parse_params(raw), images, torch.device("cpu"), NullTracker(), tmp_path / name, progress=False, step_fn=step_fn
    )


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_last_snapshots_of_the_sampling_weights_are_kept_the_final_one_last(tmp_path):
    tr = _trainer(tmp_path)
    assert tr.total_steps == 9
    tr.fit()
    assert [step for step, _ in tr.snapshots] == [5, 7, 9]  # every 2 back from the last step
    assert _same(tr.snapshots[-1][1], tr.ema.state_dict())  # the last is the final sampling (EMA) weights
    assert not _same(tr.snapshots[0][1], tr.snapshots[-1][1])
    off = _trainer(tmp_path, name="off.pt", snapshots=0)
    off.fit()
    assert off.snapshots == []


def test_snapshots_survive_an_interruption_and_resume_exactly(tmp_path):
    reference = _trainer(tmp_path, name="ref.pt")
    reference.fit()

    def stop_at_6(model, optimizer, *args, **kwargs):
        if interrupted.step == 6:  # after the first snapshot (step 5), before the second
            interrupted._signal = 15
        return cd_step(model, optimizer, *args, **kwargs)

    interrupted = _trainer(tmp_path, step_fn=stop_at_6, name="run.pt")
    with pytest.raises(TrainingInterrupted):
        interrupted.fit()
    resumed = _trainer(tmp_path, name="run.pt")
    assert resumed.try_resume() and resumed.step == 7 and [s for s, _ in resumed.snapshots] == [5, 7]
    resumed.fit()
    assert [s for s, _ in resumed.snapshots] == [5, 7, 9]
    for (_, got), (_, want) in zip(resumed.snapshots, reference.snapshots):
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_generation_splits_the_chains_over_the_networks_in_order_from_one_generator():
    params = parse_params(tiny_params_dict({
        "langevin": {"step_size": 10.0, "noise": 0.02, "grad_clip": 0.05, "precision": "fp32", "workers": 1},
        "generate": {"step_size": 3.0, "n_samples": 5, "batch_size": 2, "steps": 4, "chain_rows": 2,
                     "chain_steps": [0, 3], "final_steps": 0},
    }))
    torch.manual_seed(0)
    a, b = EnergyNet.from_config(params.model), EnergyNet.from_config(params.model)
    cpu = torch.device("cpu")
    samples, chains = generate_samples([a, b], params.generate, params.langevin, cpu, progress=False)

    generator = torch.Generator().manual_seed(params.generate.seed)
    expected = []
    for net, n in ((a, 2), (a, 1), (b, 2)):  # shares 3 and 2 of the 5 chains, in batches of at most 2
        x0 = uniform_noise(n, IMAGE_SHAPE, device="cpu", generator=generator)
        x, _ = langevin(net, x0, steps=4, step_size=3.0, noise=0.02, grad_clip=0.05, generator=generator)
        expected.append(x)
    # interleaved: a0 b0 a1 b1 a2, so that the first samples (the grid) show both networks
    torch.testing.assert_close(samples, torch.cat(expected)[[0, 3, 1, 4, 2]])
    torch.testing.assert_close(chains[3], samples[[0, 2]])  # the chain figure: the first network's first chains

    alone, _ = generate_samples(a, params.generate, params.langevin, cpu, progress=False)
    in_a_list, _ = generate_samples([a], params.generate, params.langevin, cpu, progress=False)
    assert torch.equal(alone, in_a_list)


def test_load_snapshots_gives_the_last_ones_final_first_or_a_one_line_error():
    torch.manual_seed(0)
    nets = [EnergyNet.from_config(parse_params(tiny_params_dict()).model) for _ in range(3)]
    blob = {"snapshots": [{"step": s, "model": n.state_dict()} for s, n in zip((5, 7, 9), nets)]}
    final = nets[2]
    assert load_snapshots(final, blob, 1, "ebm.pt") == [final]
    got = load_snapshots(final, blob, 2, "ebm.pt")
    assert [_same(g.state_dict(), n.state_dict()) for g, n in zip(got, (nets[2], nets[1]))] == [True, True]
    with pytest.raises(CheckpointError, match=r"generate.snapshots is 4, but ebm.pt keeps 3 snapshots") as err:
        load_snapshots(final, blob, 4, "ebm.pt")
    assert "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match="keeps 0 snapshots"):
        load_snapshots(final, {}, 2, "ebm.pt")  # a model file written before snapshots were kept


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"train": {"snapshots": -1}}, "train.snapshots"),
        ({"train": {"snapshot_every": 0}}, "train.snapshot_every"),
        ({"generate": {"snapshots": 0}}, "generate.snapshots"),
        ({"train": {"snapshots": 2}, "generate": {"snapshots": 3}}, "generate.snapshots"),
    ],
)
def test_bad_snapshot_values_are_one_line_errors(overrides, key):
    with pytest.raises(ConfigError, match=f"{key}="):
        parse_params(tiny_params_dict(overrides))


def test_the_stages_keep_snapshots_in_the_model_file_and_generate_from_them(baseline, tmp_path):
    blob = safe_load(baseline.path / "models" / "ebm.pt", MODEL_FORMAT)  # the tiny run: 3 snapshots, 2 steps apart
    steps = blob["steps"]
    assert [s["step"] for s in blob["snapshots"]] == [steps - 4, steps - 2, steps]
    assert _same(blob["snapshots"][-1]["model"], blob["model"])
    assert json.loads((baseline.path / "metrics" / "generate.json").read_text())["snapshots"] == 3
    assert np.load(baseline.path / "samples" / "samples.npy").shape == (24, 1, 32, 32)

    repo = baseline.copy(tmp_path / "repo")
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["train"]["snapshots"], raw["generate"]["snapshots"] = 4, 4  # more than the model file keeps: one line
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = run([sys.executable, "-m", "pipeline", "generate", "--no-progress"], repo, check=False)
    assert proc.returncode != 0
    assert "generate.snapshots is 4, but models/ebm.pt keeps 3 snapshots of its training" in proc.stderr
    assert "Traceback" not in proc.stderr
