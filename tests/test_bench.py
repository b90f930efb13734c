"""The benchmark runs on a tiny config and prints its lines (it is not a timed test)."""

import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_params_dict


def test_bench_prints_every_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench", "--params", str(params), "--iters", "2", "--steps", "3", "--batch-size", "16",
         # --gen-steps below the tiny config's hot end (final_steps 2): scaled with it, not refused
         "--gen-samples", "8", "--gen-steps", "1", "--ablation", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "batch 16 x 3 Langevin steps" in out
    for needle in ("eager fp32 reference:", "project trainer:", "matmul", "generate: 8 samples x 1 Langevin steps",
                   "peak memory:"):
        assert needle in out, out
    # generation splits its chains over generate.snapshots networks (3 in the tiny config), as the stage does
    assert "chains split over 3 networks, as generate.snapshots" in out, out
    ablation = [line for line in out.splitlines() if line.startswith("sampler alone (")]
    assert len(ablation) == 1 and "16 chains x 3 steps" in ablation[0]
    from pipeline.bench import SAMPLER_VARIANTS

    cells = ablation[0].split(": ", 1)[1].split(" | ")
    assert [cell.rsplit(" ", 2)[0] for cell in cells] == [variant[0] for variant in SAMPLER_VARIANTS], ablation[0]
    speedup = [line for line in out.splitlines() if line.startswith("speedup: ")]
    assert len(speedup) == 1 and speedup[0].endswith("x") and float(speedup[0][9:-1]) > 0


def test_bench_rejects_a_bad_value_in_one_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params_dict()))
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "bench", "--params", str(params), "--set", "langevin.step_size=-1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["params: langevin.step_size=-1.0 is invalid: a number > 0"]


def _conv_flops(c_in: int, c_out: int, kernel: int, out_size: int) -> int:
    """2 x multiply-adds of a convolution: every output value sums c_in x kernel^2 products."""
    return 2 * c_out * out_size * out_size * c_in * kernel * kernel


def test_forward_flops_matches_a_hand_count():
    from pipeline.bench import forward_flops
    from pipeline.model import EnergyNet

    book = (
        _conv_flops(1, 16, 5, 16)  # 32 -> 16
        + _conv_flops(16, 32, 3, 8)
        + _conv_flops(32, 64, 3, 4)
        + _conv_flops(64, 64, 3, 2)
        + 2 * 256 * 64  # flatten (64 x 2 x 2) -> hidden
        + 2 * 64 * 1
    )
    assert book == 1_712_256
    assert forward_flops(EnergyNet()) == book
    other = _conv_flops(1, 8, 5, 16) + _conv_flops(8, 8, 3, 8) + _conv_flops(8, 16, 3, 4) + _conv_flops(16, 4, 3, 2)
    other += 2 * 16 * 10 + 2 * 10 * 1
    assert forward_flops(EnergyNet(channels=(8, 8, 16, 4), hidden=10)) == other


@pytest.mark.parametrize("sampler", ["the network", "the fp32 sampler copy"])
def test_eager_reference_step_makes_the_same_update_as_cd_step(sampler):
    """The benchmark's baseline does the trainer's work: the same samples, gradient and weights from one state.

    Both are made deterministic: no Langevin or real-image noise, no fresh noise in the buffer draw,
    and a buffer of copies of one image, so any draw starts every chain from the same image. A small
    gradient clip makes the clip act on part of the pixels. The trainer's sampler is the network
    itself or, as in the benchmark, its fp32 copy (channels-last, first layer by phases), which sums
    the same products in another order.
    """
    import torch

    from pipeline.bench import eager_reference_step
    from pipeline.buffer import ReplayBuffer
    from pipeline.config import parse_params
    from pipeline.langevin import score_in_precision
    from pipeline.model import IMAGE_SHAPE, EnergyNet
    from pipeline.train import cd_step

    params = parse_params(tiny_params_dict({
        "langevin": {"steps": 5, "noise": 0.0, "grad_clip": 5e-5, "precision": "fp32"},
        "train": {"real_noise": 0.0, "alpha": 0.3},
        "buffer": {"reinit_prob": 0.0},
    }))
    lcfg, tcfg, n = params.langevin, params.train, params.train.batch_size
    torch.manual_seed(0)
    start = EnergyNet.from_config(params.model)
    g = torch.Generator().manual_seed(1)
    real = torch.rand(n, *IMAGE_SHAPE, generator=g) * 2 - 1
    start_image = torch.rand(1, *IMAGE_SHAPE, generator=g) * 2 - 1
    stored = start_image.expand(params.buffer.size, *IMAGE_SHAPE).clone()

    def fresh():
        model = EnergyNet.from_config(params.model)
        model.load_state_dict(start.state_dict())
        return model, torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))

    eager, eager_opt = fresh()
    eager_fake = eager_reference_step(
        eager, eager_opt, stored, real.clone(), lcfg.steps, lcfg.step_size, lcfg.noise, lcfg.grad_clip, tcfg.alpha,
        params.buffer.reinit_prob, tcfg.real_noise,
    )
    mine, mine_opt = fresh()
    buffer = ReplayBuffer(params.buffer.size, IMAGE_SHAPE, params.buffer.reinit_prob)
    buffer.push(stored)
    score_fn = score_in_precision(mine, "fp32") if sampler == "the fp32 sampler copy" else None
    cd_step(mine, mine_opt, buffer, real.clone(), langevin_cfg=lcfg, train_cfg=tcfg,
            generator=torch.Generator().manual_seed(2), score_fn=score_fn)
    mine_fake = buffer.storage[buffer.ptr - n : buffer.ptr]  # the samples cd_step pushed

    moved = (eager_fake - start_image).abs()
    clipped = (moved - lcfg.steps * lcfg.step_size * lcfg.grad_clip).abs() < 1e-7
    assert moved.max() > 0 and clipped.any() and not clipped.all()  # the chains moved, the clip acted on some pixels
    assert torch.allclose(mine_fake, eager_fake, rtol=0, atol=1e-6)
    for (name, p_eager), p_mine in zip(eager.named_parameters(), mine.parameters()):
        state_eager, state_mine = eager_opt.state[p_eager], mine_opt.state[p_mine]
        grad_eager = state_eager["exp_avg"]  # (1 - beta1) x the gradient, after one step
        assert grad_eager.abs().max() > 0, name
        # the same gradient, up to fp32 sums in another order
        assert (state_mine["exp_avg"] - grad_eager).abs().max() <= 1e-4 * grad_eager.abs().max(), name
        # Adam's first step is about lr x sign(gradient): the same weights, to a small part of lr
        assert (p_mine - p_eager).abs().max() <= 0.05 * tcfg.lr, name
        assert (p_eager - start.state_dict()[name]).abs().max() > 0.5 * tcfg.lr, name


def test_levers_time_every_convolution_in_each_candidate_kernel():
    """`bench --levers`: per convolution, forward and input gradient in each implementation (no compile here)."""
    import io

    from pipeline import levers
    from pipeline.config import parse_params

    params = parse_params(tiny_params_dict({"train": {"batch_size": 8}, "langevin": {"workers": 2}}))
    out = io.StringIO()
    results = levers.run(params, reps=1, repeats=1, compile_step=False, out=out)
    text = out.getvalue()
    assert "4 images (one group of chains) on 1 thread" in text
    assert list(results) == [
        "conv 1->16 k5 s2 at 32x32", "conv 16->32 k3 s2 at 16x16", "conv 32->64 k3 s2 at 8x8", "conv 64->64 k3 s2 at 4x4",
    ]
    kernels = {"forward oneDNN NCHW", "forward oneDNN channels-last", "forward native", "input gradient oneDNN NCHW",
               "input gradient oneDNN channels-last", "input gradient native"}
    for name, times in results.items():
        phases = {"input gradient by phases (channels-last)"} if name.startswith("conv 1->") else set()
        assert set(times) == kernels | phases, name
        assert all(t > 0 for t in times.values())
        assert name in text


def test_each_lever_candidate_computes_the_same_thing():
    """The kernels compared are interchangeable: the same forward and the same input gradient."""
    import torch

    from pipeline.levers import layer_candidates
    from pipeline.model import EnergyNet

    torch.manual_seed(0)
    model = EnergyNet()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    for layer in model.features:
        if isinstance(layer, torch.nn.Conv2d):
            results = {name: fn() for name, fn in layer_candidates(layer, x).items()}
            forward = [v for k, v in results.items() if k.startswith("forward")]
            grads = [v for k, v in results.items() if k.startswith("input gradient")]
            assert all(torch.allclose(f, forward[0], atol=1e-5) for f in forward)
            assert all(torch.allclose(g, grads[0], atol=1e-5) for g in grads)
        x = layer(x).detach()
