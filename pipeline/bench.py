"""``python -m pipeline bench``: training and Langevin throughput at book settings.

Book settings are batch 128 x 60 Langevin steps per iteration (``--batch-size``, ``--steps``),
whatever params.yaml trains with; every other value comes from params.yaml (``--set`` changes it).

In one process and one run it times (1) a plain eager fp32 PyTorch implementation of the CD
training step, written here with no tricks, and (2) the project's trainer step as configured
by params.yaml, and prints the speed-up. It also prints the achieved GFLOP/s inside Langevin
next to a large matrix multiply timed in the same run, the peak memory, and the time to
generate samples from noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.buffer import ReplayBuffer
from pipeline.config import ConfigError, Params, with_overrides
from pipeline.experiments import check_overrides, parse_set
from pipeline.generate import generate_samples
from pipeline.langevin import resolve_kernels, sample, score_in_precision
from pipeline.model import IMAGE_SHAPE, EnergyNet, frozen
from pipeline.runtime import describe, hardware, resolve_device, resolve_precision
from pipeline.train import cd_step


def forward_flops(model: EnergyNet, image_shape: tuple[int, ...] = IMAGE_SHAPE) -> int:
    """Multiply-adds x 2 of one forward pass of one image, counted from the layer shapes."""
    flops = 0
    hooks = []

    def conv_hook(module, inputs, output):
        nonlocal flops
        k = module.kernel_size[0] * module.kernel_size[1]
        flops += 2 * output[0].numel() * module.in_channels * k

    def linear_hook(module, inputs, output):
        nonlocal flops
        flops += 2 * module.in_features * module.out_features

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(torch.zeros(1, *image_shape, device=next(model.parameters()).device))
    for h in hooks:
        h.remove()
    return flops


def eager_reference_step(
    model, optimizer, buffer_images, real, steps, step_size, noise, grad_clip, alpha, reinit_prob, real_noise
):
    """The CD step as a plain fp32 eager loop, the way a tutorial writes it (the baseline)."""
    n = real.shape[0]
    real = (real + real_noise * torch.randn_like(real)).clamp(-1, 1)
    n_new = int(torch.distributions.Binomial(n, torch.tensor(reinit_prob)).sample().item())
    fresh = torch.rand(n_new, *real.shape[1:], device=real.device) * 2 - 1
    old = buffer_images[torch.randint(0, buffer_images.shape[0], (n - n_new,), device=real.device)]
    x = torch.cat([fresh, old]).detach()
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in range(steps):
        x = (x + noise * torch.randn_like(x)).clamp(-1, 1).requires_grad_(True)
        grad = torch.autograd.grad(model(x).sum(), x)[0]
        if grad_clip > 0:  # 0 = no clip, as in the trainer
            grad = grad.clamp(-grad_clip, grad_clip)
        x = (x + step_size * grad).clamp(-1, 1).detach()
    for p in model.parameters():
        p.requires_grad_(True)
    scores = model(torch.cat([real, x]))
    real_s, fake_s = scores[:n], scores[n:]
    loss = fake_s.mean() - real_s.mean() + alpha * (real_s.pow(2).mean() + fake_s.pow(2).mean())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def matmul_gflops(device: torch.device, dtype: torch.dtype, n: int, iters: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _time(lambda: torch.mm(a, b), iters, 2, device)
    return 2 * n**3 / seconds / 1e9


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(params: Params, iters: int, gen_samples: int, gen_steps: int, out=sys.stdout) -> dict[str, float]:
    device = resolve_device(params.runtime)
    # The baseline runs with torch's defaults: denormals on. torch's worker threads take the
    # floating-point mode of the thread that starts them, so the baseline runs (and starts
    # them) before the project's flush-to-zero setting is switched on below.
    torch.set_flush_denormal(False)
    lcfg, tcfg, bcfg = params.langevin, params.train, params.buffer
    batch = tcfg.batch_size
    torch.manual_seed(0)
    real = (torch.rand(batch, *IMAGE_SHAPE, device=device) * 2 - 1)
    filled = torch.rand(bcfg.size, *IMAGE_SHAPE, device=device) * 2 - 1

    def emit(line: str) -> None:
        print(line, file=out, flush=True)

    precision = resolve_precision(lcfg.precision, device)
    hw = hardware(device)
    native = hw["bf16_native"] == "true"
    if device.type == "cpu":
        emit(f"cpu: {hw['cpu_model']}; ISA {hw['cpu_isa']}; {torch.get_num_threads()} threads; "
             f"bf16 {'native' if native else 'not native (emulated)'}")
    kernels = resolve_kernels(lcfg.kernels, precision, device)
    emit(f"device: {describe(device)}; batch {batch} x {lcfg.steps} Langevin steps; "
         f"precision {lcfg.precision}" + (f" -> {precision}" if lcfg.precision == "auto" else "")
         + f"; kernels {lcfg.kernels}" + (f" -> {kernels}" if lcfg.kernels == "auto" else ""))

    # (1) the eager fp32 baseline
    base_model = EnergyNet.from_config(params.model).to(device)
    base_opt = torch.optim.Adam(base_model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))

    def eager() -> None:
        eager_reference_step(
            base_model, base_opt, filled, real, lcfg.steps, lcfg.step_size, lcfg.noise, lcfg.grad_clip,
            tcfg.alpha, bcfg.reinit_prob, tcfg.real_noise,
        )

    # (2) the project's trainer step
    model = EnergyNet.from_config(params.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    buffer = ReplayBuffer.from_config(bcfg, IMAGE_SHAPE, device)
    buffer.push(filled)
    generator = torch.Generator(device=device).manual_seed(0)
    score_fn = score_in_precision(model, precision, lcfg.kernels)

    def project() -> None:
        cd_step(model, optimizer, buffer, real, langevin_cfg=lcfg, train_cfg=tcfg, generator=generator, score_fn=score_fn)

    def baseline() -> None:
        torch.set_flush_denormal(False)  # the baseline runs with torch's defaults
        try:
            eager()
        finally:
            torch.set_flush_denormal(params.runtime.flush_denormal)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # Alternate the two, one iteration at a time, and take medians: on a shared machine the
    # speed drifts, and alternating exposes both implementations to the same drift.
    baseline()
    torch.set_flush_denormal(params.runtime.flush_denormal)
    project()
    eager_times, project_times = [], []
    for _ in range(iters):
        eager_times.append(_time(baseline, 1, 0, device))
        project_times.append(_time(project, 1, 0, device))
    eager_s, project_s = statistics.median(eager_times), statistics.median(project_times)

    image_steps = batch * lcfg.steps
    flops_per_step = 2 * forward_flops(model)  # forward + input-gradient backward, per image
    langevin_flops = image_steps * flops_per_step
    results = {
        "precision": precision,
        "kernels": score_fn.kernels,
        "eager_it_per_s": 1 / eager_s,
        "project_it_per_s": 1 / project_s,
        "speedup": eager_s / project_s,
        "eager_image_steps_per_s": image_steps / eager_s,
        "project_image_steps_per_s": image_steps / project_s,
        "eager_gflops": langevin_flops / eager_s / 1e9,
        "project_gflops": langevin_flops / project_s / 1e9,
    }
    emit(f"eager fp32 reference: {results['eager_it_per_s']:.3f} it/s ({eager_s * 1000:.1f} ms/it), "
         f"{results['eager_image_steps_per_s']:,.0f} Langevin image-steps/s, {results['eager_gflops']:.1f} GFLOP/s")
    emit(f"project trainer:      {results['project_it_per_s']:.3f} it/s ({project_s * 1000:.1f} ms/it), "
         f"{results['project_image_steps_per_s']:,.0f} Langevin image-steps/s, {results['project_gflops']:.1f} GFLOP/s")
    emit(f"speedup: {results['speedup']:.2f}x")

    n = 2048 if device.type == "cpu" else 8192
    results["matmul_fp32_gflops"] = matmul_gflops(device, torch.float32, n, 3)
    if native:
        results["matmul_bf16_gflops"] = matmul_gflops(device, torch.bfloat16, n, 3)
        bf16 = f"bf16 {results['matmul_bf16_gflops']:.0f} GFLOP/s"
    else:  # emulated bf16 is several times slower than fp32: minutes of matmul that tell nothing
        bf16 = "bf16 skipped (not native here)"
    emit(f"matmul {n}x{n}: fp32 {results['matmul_fp32_gflops']:.0f} GFLOP/s, {bf16} (the practical limit); "
         f"Langevin reaches {results['project_gflops']:.1f} GFLOP/s "
         f"({100 * results['project_gflops'] / results['matmul_fp32_gflops']:.0f}% of fp32 matmul)")

    gen_cfg = with_overrides(
        params, {"generate.n_samples": gen_samples, "generate.steps": gen_steps,
                 "generate.batch_size": min(gen_samples, params.generate.batch_size),
                 "generate.chain_rows": min(gen_samples, params.generate.chain_rows),
                 "generate.chain_steps": [gen_steps - 1],
                 # the hot end keeps its share of the chain, so --gen-steps below final_steps stays valid
                 "generate.final_steps": round(params.generate.final_steps * gen_steps / params.generate.steps)},
    ).generate
    # the generate stage splits the chains over generate.snapshots networks, in batches per network: the same
    # split here (copies of one network; the cost does not depend on the weights)
    networks = [model] * min(params.generate.snapshots, gen_samples)
    start = time.perf_counter()
    generate_samples(networks, gen_cfg, lcfg, device, progress=False)
    _sync(device)
    results["generate_seconds"] = time.perf_counter() - start
    results["generate_networks"] = len(networks)
    emit(f"generate: {gen_samples} samples x {gen_steps} Langevin steps in {results['generate_seconds']:.1f} s "
         f"(chains split over {len(networks)} network{'s' * (len(networks) > 1)}, as generate.snapshots)")

    results["peak_rss_mib"] = peak_rss_mib()
    line = f"peak memory: {results['peak_rss_mib']:.0f} MiB RSS"
    if device.type == "cuda":
        results["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        line += f", {results['cuda_max_allocated_mib']:.0f} MiB CUDA max allocated"
    emit(line)
    return results


SAMPLER_VARIANTS = (  # (label, SamplerScore shortcuts, langevin.workers or None for the configured)
    ("as written", {"channels_last": False, "without_autograd": False, "by_phases": False, "kernels": "aten"}, None),
    ("+ channels-last", {"without_autograd": False, "by_phases": False, "kernels": "aten"}, None),
    ("+ without autograd", {"by_phases": False, "kernels": "aten"}, None),
    ("+ first layer by phases", {"kernels": "aten"}, None),
    ("+ compiled kernels (the trainer's)", {}, None),
    ("the trainer's in one group of chains", {}, 1),
)


def sampler_ablation(params: Params, reps: int, out=sys.stdout) -> dict[str, float]:
    """Langevin alone (one training iteration's chains), adding the sampler's shortcuts one at a time.

    "as written" is the network itself under autograd (bf16: its bf16 copy, which is always
    channels-last, so the first two coincide there). The last variant runs the trainer's
    sampler as one group of chains on torch's intra-op threads instead of one group per core
    (``langevin.workers``). The variants alternate, one call at a time, ``reps`` times; medians
    in seconds.
    """
    device = resolve_device(params.runtime)
    lcfg, batch = params.langevin, params.train.batch_size
    torch.set_flush_denormal(params.runtime.flush_denormal)
    model = EnergyNet.from_config(params.model).to(device)
    x0 = torch.rand(batch, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    precision = resolve_precision(lcfg.precision, device)
    scores = {
        label: score_in_precision(model, precision, **{"kernels": lcfg.kernels, **kw}) for label, kw, _ in SAMPLER_VARIANTS
    }
    configs = {
        label: lcfg if workers is None else dataclasses.replace(lcfg, workers=workers)
        for label, _, workers in SAMPLER_VARIANTS
    }
    times: dict[str, list[float]] = {label: [] for label in scores}
    with frozen(model):
        for rep in range(reps + 1):  # the first round warms up
            for label, score in scores.items():
                generator = torch.Generator(device=device).manual_seed(rep)
                seconds = _time(lambda: sample(score, x0, configs[label], generator=generator), 1, 0, device)
                if rep:
                    times[label].append(seconds)
    medians = {label: statistics.median(t) for label, t in times.items()}
    cells = " | ".join(f"{label} {1000 * s:.1f} ms" for label, s in medians.items())
    print(f"sampler alone ({precision}, {batch} chains x {lcfg.steps} steps, median of {reps}): {cells}",
          file=out, flush=True)
    return medians


def main(params: Params, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline bench")
    parser.add_argument("--iters", type=int, default=20, help="timed training iterations per implementation (alternating)")
    parser.add_argument("--steps", type=int, default=60, help="Langevin steps per iteration (the book's 60)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per iteration (the book's 128)")
    parser.add_argument("--gen-samples", type=int, help="samples generated (default: generate.n_samples)")
    parser.add_argument("--gen-steps", type=int, help="Langevin steps of each (default: generate.steps)")
    parser.add_argument("--ablation", type=int, default=0, metavar="N",
                        help="also time the sampler alone with each gradient shortcut on and off, N times each")
    parser.add_argument("--levers", type=int, default=0, metavar="N",
                        help="also time each convolution's candidate kernels and torch.compile of the sampler's "
                             "gradient, N rounds each (pipeline/levers.py)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this benchmark, e.g. --set langevin.precision=fp32")
    args = parser.parse_args(argv)
    # Book settings whatever params.yaml trains with; --set can still change anything. Values are
    # read as `dvc exp run -S`, the flow and the comparison read them.
    overrides: dict[str, Any] = {"langevin.steps": args.steps, "train.batch_size": args.batch_size}
    try:
        overrides.update(parse_set(args.set))
        params, _ = check_overrides(params, overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    run(params, args.iters, args.gen_samples or params.generate.n_samples, args.gen_steps or params.generate.steps)
    if args.ablation > 0:
        sampler_ablation(params, args.ablation)
    if args.levers > 0:
        from pipeline import levers

        levers.run(params, args.levers)
    return 0
