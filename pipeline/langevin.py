"""Langevin dynamics on a score function: noisy gradient ascent on s(x) w.r.t. the input.

A pure function of a callable: it knows nothing of models, buffers or optimizers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch

from pipeline import native
from pipeline.config import LangevinConfig
from pipeline.inputgrad import chain_input_grad, layer_chain
from pipeline.nativegrad import CompiledChain, compiled_chain
from pipeline.polyphase import PolyphaseConv2d, polyphase_first_layers
from pipeline.runtime import chain_workers, resolve_precision

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def langevin(
    score_fn: ScoreFn,
    x0: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise: float,
    grad_clip: float,
    generator: torch.Generator | None = None,
    record_at: Iterable[int] = (),
    clamp: tuple[float, float] | None = (-1.0, 1.0),
    progress: Callable[[int], None] | None = None,
    workers: int = 1,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run ``steps`` Langevin steps from ``x0``; return the final images and the recorded ones.

    Per step: add N(0, noise^2) and clamp; take d s(x) / dx; clip it elementwise to
    +-grad_clip (0 = no clip); move x by step_size * gradient; clamp again.
    ``record_at`` holds 0-based step indices whose result (after that step) is kept on CPU:
    index 0 is the image after the first step, index steps-1 the final one, as in the book.
    ``clamp=None`` leaves the support unbounded (for analytic tests on unbounded targets).

    ``mask`` (bool, broadcastable to ``x0``; True = free) samples conditionally: only the free
    pixels move, and the others are put back to their values in ``x0`` after the noise and after
    the step, so they come out bit for bit as given (inpainting, restoration). The gradient is
    still that of the whole image, known pixels included: they condition the free ones.

    ``workers > 1`` (CPU only) splits the chains, which are independent, into that many
    contiguous groups run side by side on threads, one core each. This network's operations
    are too small to keep two cores busy inside one operation, so chain parallelism is faster
    than torch's intra-op threads. Each group draws its noise from its own generator, seeded
    from ``generator``, so the result is deterministic whatever the thread scheduling.
    """
    kwargs = dict(steps=steps, step_size=step_size, noise=noise, grad_clip=grad_clip, clamp=clamp)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"langevin: mask must be a bool tensor (True = free pixel), got {mask.dtype}")
        mask = mask.to(x0.device).expand(x0.shape)  # a view: each group of chains takes its rows
    groups = min(workers, x0.shape[0])
    if groups <= 1 or x0.device.type != "cpu":
        return _chains(score_fn, x0, generator=generator, record_at=record_at, progress=progress, mask=mask, **kwargs)
    seeds = torch.randint(0, 2**62, (groups,), generator=generator).tolist()
    parts = torch.tensor_split(x0, groups)
    masks = torch.tensor_split(mask, groups) if mask is not None else (None,) * groups
    intra_op = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [
            _pool(groups).submit(
                _single_threaded_chains,
                score_fn,
                part,
                generator=torch.Generator().manual_seed(seed),
                record_at=record_at,
                progress=progress if i == 0 else None,
                mask=part_mask,
                **kwargs,
            )
            for i, (part, part_mask, seed) in enumerate(zip(parts, masks, seeds))
        ]
        results = [f.result() for f in futures]
    finally:
        torch.set_num_threads(intra_op)
    x = torch.cat([r[0] for r in results])
    snapshots = {k: torch.cat([r[1][k] for r in results]) for k in results[0][1]}
    return x, snapshots


def sample(
    score_fn: ScoreFn,
    x0: torch.Tensor,
    cfg: LangevinConfig,
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    record_at: Iterable[int] = (),
    progress: Callable[[int], None] | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``langevin`` with the step size, noise, clip and workers of a ``langevin`` params section."""
    return langevin(
        score_fn,
        x0,
        steps=cfg.steps if steps is None else steps,
        step_size=cfg.step_size,
        noise=cfg.noise,
        grad_clip=cfg.grad_clip,
        generator=generator,
        record_at=record_at,
        progress=progress,
        workers=chain_workers(cfg.workers, x0.device),
        mask=mask,
    )


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="langevin")
    return _POOLS[workers]


def _single_threaded_chains(*args, **kwargs) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    torch.set_num_threads(1)  # one core per group of chains
    return _chains(*args, **kwargs)


def _chains(
    score_fn: ScoreFn,
    x0: torch.Tensor,
    *,
    steps: int,
    step_size: float,
    noise: float,
    grad_clip: float,
    generator: torch.Generator | None,
    record_at: Iterable[int],
    clamp: tuple[float, float] | None,
    progress: Callable[[int], None] | None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    record = set(record_at)
    snapshots: dict[int, torch.Tensor] = {}
    input_grad = getattr(score_fn, "input_grad", None)  # d sum(score) / dx without autograd, when offered
    x = x0.detach().clone()
    known = x0.detach() if mask is not None else None
    lo, hi = clamp if clamp is not None else (None, None)
    for step in range(steps):
        if noise > 0:
            x.add_(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), alpha=noise)
        if clamp is not None:
            x.clamp_(lo, hi)
        if mask is not None:
            x = torch.where(mask, x, known)
        if input_grad is not None:
            grad = input_grad(x)
        else:
            x.requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(score_fn(x).sum(), x)
            x = x.detach()
        if grad_clip > 0:
            grad.clamp_(-grad_clip, grad_clip)
        x.add_(grad.to(x.dtype), alpha=step_size)
        if clamp is not None:
            x.clamp_(lo, hi)
        if mask is not None:
            x = torch.where(mask, x, known)
        if step in record:
            snapshots[step] = x.detach().cpu().clone()
        if progress is not None:
            progress(step)
    return x, snapshots


class SamplerScore:
    """The model as the sampler's score callable, in the sampler's precision.

    The sampler runs a copy of the weights, refreshed by ``sync()`` after each optimizer step, in
    channels-last layout, which oneDNN's convolutions (CPU) and cuDNN's tensor cores (GPU) prefer:
    in bf16 wherever bf16 is chosen, and in fp32 on the CPU. bf16 casts the weights once per
    training iteration instead of on every Langevin step, which autocast would do. The images
    stay float32 throughout, since bf16 cannot resolve the sampler's 0.005 noise near |x| = 1;
    only the network's arithmetic is bf16, and the gradient comes back as float32 through the
    input cast. On CPU the copy's one-channel stride-2 convolutions (the first layer) take their
    input gradient by phases (``pipeline/polyphase.py``): the same forward, the same gradient up
    to the order of its sums, and in fp32 about 4x faster than oneDNN's own for this layer. fp32
    on a GPU is the network as written.

    ``input_grad`` gives the sampler d sum(score) / dx without autograd (``pipeline/inputgrad.py``),
    bit for bit autograd's gradient of the same copy.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        precision: str,
        *,
        kernels: str = "auto",
        by_phases: bool = True,
        without_autograd: bool = True,
        channels_last: bool = True,
    ) -> None:
        """``precision``: ``auto`` (bf16 where the hardware runs it natively, else fp32), fp32 or bf16.

        ``kernels`` (``langevin.kernels``): ``auto`` takes the input gradient with the compiled
        kernels (``pipeline/nativegrad.py``) where they apply (the fp32 sampler on an x86 CPU, a
        network of the book's shape) and build (a C compiler), and ATen's elsewhere; ``compiled``
        requires them (``KernelError`` where they cannot be had); ``aten`` never uses them. What was
        used is ``self.kernels``: ``compiled`` or ``aten``.

        ``by_phases``, ``without_autograd`` and ``channels_last`` switch the gradient shortcuts
        and the fp32 copy's layout (for the benchmark's ablation).
        """
        device = next(model.parameters()).device
        self.model = model
        self.precision = resolve_precision(precision, device)
        self.shadow: torch.nn.Module | None = None
        self.polyphase: list[PolyphaseConv2d] = []
        on_cpu = device.type == "cpu"
        if self.precision == "bf16" or (on_cpu and channels_last):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self.shadow = copy.deepcopy(model).to(dtype=dtype, memory_format=torch.channels_last)
            for p in self.shadow.parameters():
                p.requires_grad_(False)
            if by_phases and on_cpu:  # measured there only
                self.polyphase = polyphase_first_layers(self.shadow)
        self.layers = layer_chain(self.shadow if self.shadow is not None else model) if without_autograd else None
        self.compiled: CompiledChain | None = None
        if resolve_kernels(kernels, self.precision, device) == "compiled":
            self.compiled = compiled_chain(self.layers)
            if self.compiled is None and kernels == "compiled":
                raise KernelError(_refusal(_why_not_this_network(self.layers)))
        self.kernels = "compiled" if self.compiled is not None else "aten"

    @torch.no_grad()
    def sync(self) -> None:
        if self.shadow is not None:
            for mine, source in zip(self.shadow.parameters(), self.model.parameters()):
                mine.copy_(source)
            for layer in self.polyphase:
                layer.refresh()
        if self.compiled is not None:
            self.compiled.refresh()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.shadow is None:
            return self.model(x)
        return self.shadow(self._cast(x)).float()

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        return x.to(dtype).contiguous(memory_format=torch.channels_last)

    @property
    def input_grad(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """d sum(self(x)) / dx (float32, x's shape) computed without autograd, or None where the
        network is not a chain of layers ``pipeline/inputgrad.py`` knows (then the sampler uses autograd)."""
        if self.layers is None:
            return None
        if self.compiled is not None:
            return lambda x: self.compiled(x.float())
        if self.shadow is None:
            return lambda x: chain_input_grad(self.layers, x)
        return lambda x: chain_input_grad(self.layers, self._cast(x)).float()


class KernelError(RuntimeError):
    """``langevin.kernels: compiled`` where the compiled kernels cannot be used, worded as one line."""


def resolve_kernels(requested: str, precision: str, device: torch.device) -> str:
    """What computes the sampler's input gradient: ``compiled`` (``pipeline/nativegrad.py``) or ``aten``.

    ``auto`` is ``compiled`` for the fp32 sampler on the CPU where the kernels build, else ``aten``;
    ``compiled`` there too, and a ``KernelError`` elsewhere; ``aten`` stays. (A network not of the
    book's shape also falls back; ``SamplerScore.kernels`` says what one sampler used.)
    """
    if requested not in ("auto", "compiled", "aten"):
        raise ValueError(f"langevin: kernels must be auto, compiled or aten, got {requested!r}")
    if requested == "aten":
        return "aten"
    precision = resolve_precision(precision, device)
    why = _why_no_kernels_here(precision, device)
    if why is None:
        return "compiled"
    if requested == "compiled":
        raise KernelError(_refusal(why))
    if device.type == "cpu" and precision == "fp32":
        native.warn_fallback()  # the one case worth a word: the kernels apply here but did not build
    return "aten"


def _why_no_kernels_here(precision: str, device: torch.device) -> str | None:
    """Why this precision on this device cannot have the compiled kernels, whatever the network; None if it can."""
    if device.type != "cpu" or precision != "fp32":
        return f"they serve the fp32 sampler on the CPU, and this one runs {precision} on {device.type}"
    if native.load() is None:
        return f"they could not be built here: {native.reason()}"
    return None


def _why_not_this_network(layers: list[torch.nn.Module] | None) -> str:
    if layers is None:
        return "the network is not a chain of layers the sampler differentiates without autograd"
    return "the network is not of the book's shape (pipeline/nativegrad.py: split_chain)"


def _refusal(why: str) -> str:
    return f"langevin: langevin.kernels=compiled, but {why}; set langevin.kernels: auto (or aten)"


def score_in_precision(model: torch.nn.Module, precision: str, kernels: str = "auto", **shortcuts: bool) -> SamplerScore:
    """A synced ``SamplerScore`` of ``model``."""
    score = SamplerScore(model, precision, kernels=kernels, **shortcuts)
    score.sync()
    return score
