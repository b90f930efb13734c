"""Typed configuration: params.yaml -> frozen dataclasses, validated once.

Every section of params.yaml is one dataclass below. ``load_params`` rejects unknown and
missing keys, wrong types and out-of-range values with a ``ConfigError`` whose message is
one line naming the key, the value and what is allowed. No torch here: the config is
loaded (and rejected) before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params.yaml problem, worded as one line for the user."""


def _allowed(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"params: {key}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class PathsConfig:
    raw_dir: str = "data/raw"
    prepared_dir: str = "data/prepared"
    classifier: str = "models/classifier.pt"
    model: str = "models/ebm.pt"
    run_info: str = "models/run.json"
    registry_info: str = "models/registry.json"  # the register stage's record: version, alias, decision
    checkpoint_dir: str = "models/checkpoints"
    samples_dir: str = "samples"
    metrics_dir: str = "metrics"
    plots_dir: str = "plots"
    threshold: str = "models/threshold.json"  # the in/out score threshold, chosen by evaluate


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    flush_denormal: bool = True  # CPU: treat float32 values below 1e-38 as zero (denormals are ~10x slower)
    progress_seconds: float = 30.0  # seconds between plain progress lines when stderr is not a terminal; 0 = every step

    def validate(self, section: str) -> None:
        ok = self.device in ("auto", "cpu", "cuda", "mps") or (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        )
        if not ok:
            raise _allowed(f"{section}.device", self.device, "one of auto, cpu, cuda, cuda:N, mps")
        if self.threads < 0:
            raise _allowed(f"{section}.threads", self.threads, "an integer >= 0 (0 = torch's default)")
        if not self.progress_seconds >= 0 or self.progress_seconds == float("inf"):
            raise _allowed(f"{section}.progress_seconds", self.progress_seconds, "a number of seconds >= 0 (0 = every step)")


@dataclass(frozen=True)
class DataConfig:
    source: str = "mnist5k"  # mnist5k (embedded, offline) | mnist (torchvision / IDX files)
    test_fraction: float = 0.2  # mnist5k only: held-out share, stratified by digit
    limit: int = 0  # keep at most this many digits per split (0 = all): for smoke tests
    seed: int = 0

    def validate(self, section: str) -> None:
        if self.source not in ("mnist5k", "mnist"):
            raise _allowed(f"{section}.source", self.source, "one of mnist5k, mnist")
        if self.limit < 0:
            raise _allowed(f"{section}.limit", self.limit, "an integer >= 0 (0 = all)")
        if not 0.0 < self.test_fraction < 1.0:
            raise _allowed(f"{section}.test_fraction", self.test_fraction, "a number in (0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    channels: tuple[int, ...] = (16, 32, 64, 64)
    hidden: int = 64

    def validate(self, section: str) -> None:
        if len(self.channels) != 4 or any(c < 1 for c in self.channels):
            raise _allowed(f"{section}.channels", list(self.channels), "four positive integers")
        if self.hidden < 1:
            raise _allowed(f"{section}.hidden", self.hidden, "a positive integer")


@dataclass(frozen=True)
class LangevinConfig:
    steps: int = 60
    step_size: float = 10.0
    noise: float = 0.005
    grad_clip: float = 0.03  # elementwise clip of the input gradient; 0 disables it
    precision: str = "auto"  # auto | fp32 | bf16: arithmetic of the network inside the sampler
    workers: int = 0  # CPU: groups of chains run side by side, one core each; 0 = one per core
    kernels: str = "auto"  # auto | compiled | aten: the fp32 CPU sampler's input gradient (pipeline/nativegrad.py)

    def validate(self, section: str) -> None:
        if self.workers < 0:
            raise _allowed(f"{section}.workers", self.workers, "an integer >= 0 (0 = one per core)")
        if self.steps < 1:
            raise _allowed(f"{section}.steps", self.steps, "an integer >= 1")
        if self.step_size <= 0:
            raise _allowed(f"{section}.step_size", self.step_size, "a number > 0")
        if self.noise < 0:
            raise _allowed(f"{section}.noise", self.noise, "a number >= 0")
        if self.grad_clip < 0:
            raise _allowed(f"{section}.grad_clip", self.grad_clip, "a number >= 0 (0 = no clip)")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise _allowed(f"{section}.precision", self.precision, "one of auto, fp32, bf16")
        if self.kernels not in ("auto", "compiled", "aten"):
            raise _allowed(f"{section}.kernels", self.kernels, "one of auto, compiled, aten")


@dataclass(frozen=True)
class BufferConfig:
    size: int = 8192
    reinit_prob: float = 0.05
    augment_prob: float = 0.0  # share of the stored images drawn that are shifted before their chains go on
    augment_shift: int = 2  # the largest shift, in pixels along each axis (Du et al. 2021: augmented buffer samples)
    policy: str = "fifo"  # fifo: new samples replace the oldest | reservoir: a uniform sample of every one pushed

    def validate(self, section: str) -> None:
        if self.policy not in ("fifo", "reservoir"):
            raise _allowed(f"{section}.policy", self.policy, "one of fifo, reservoir")
        if self.size < 1:
            raise _allowed(f"{section}.size", self.size, "an integer >= 1")
        if not 0.0 <= self.reinit_prob <= 1.0:
            raise _allowed(f"{section}.reinit_prob", self.reinit_prob, "a number in [0, 1]")
        if not 0.0 <= self.augment_prob <= 1.0:
            raise _allowed(f"{section}.augment_prob", self.augment_prob, "a number in [0, 1]")
        if not 0 <= self.augment_shift <= 8:
            raise _allowed(f"{section}.augment_shift", self.augment_shift, "an integer in [0, 8]")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 40
    batch_size: int = 128
    lr: float = 1e-4
    beta1: float = 0.0
    beta2: float = 0.999
    alpha: float = 0.1  # weight of the score-magnitude regulariser
    real_noise: float = 0.005  # std of the noise added to real images
    weight_grad_clip: float = 0.0  # max norm of the weight gradient; 0 disables it
    lr_schedule: str = "constant"  # constant | cosine (from lr down to lr * lr_final_factor at the last step)
    lr_final_factor: float = 0.1
    ema_decay: float = 0.0  # exponential moving average of the weights, used for sampling; 0 disables it
    kl_weight: float = 0.0  # weight of the sampler's KL term (Du et al. 2021); 0 disables it
    kl_repel: float = 0.0  # weight of its nearest-neighbour entropy (samples pushed apart); needs kl_weight > 0
    kl_chains: int = 32  # chains the KL term differentiates through (at most the batch)
    kl_compare: int = 100  # earlier samples from the buffer the entropy measures distances to
    spectral_norm: bool = False  # every weight matrix divided by its largest singular value after each update
    snapshots: int = 0  # sampling weights kept in the model file from the last iterations (the last = the final)
    snapshot_every: int = 24  # iterations between two kept snapshots
    log_every: int = 10
    sample_every: int = 200  # steps between buffer-sample grids in MLflow; 0 disables them
    checkpoint_every: int = 100
    max_score: float = 1e4  # |score| above this counts as divergence
    rollback_lr_factor: float = 0.5
    max_rollbacks: int = 3

    def validate(self, section: str) -> None:
        positive_ints = (
            "epochs", "batch_size", "log_every", "checkpoint_every", "kl_chains", "kl_compare", "snapshot_every"
        )
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise _allowed(f"{section}.{name}", getattr(self, name), "an integer >= 1")
        if self.lr <= 0:
            raise _allowed(f"{section}.lr", self.lr, "a number > 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise _allowed(f"{section}.{name}", getattr(self, name), "a number in [0, 1)")
        for name in ("alpha", "real_noise", "weight_grad_clip", "kl_weight", "kl_repel"):
            if getattr(self, name) < 0:
                raise _allowed(f"{section}.{name}", getattr(self, name), "a number >= 0")
        if self.kl_repel > 0 and self.kl_weight == 0:
            raise _allowed(f"{section}.kl_repel", self.kl_repel, "0 while train.kl_weight is 0 (the entropy is part of the KL term)")
        if self.lr_schedule not in ("constant", "cosine"):
            raise _allowed(f"{section}.lr_schedule", self.lr_schedule, "one of constant, cosine")
        if not 0.0 < self.lr_final_factor <= 1.0:
            raise _allowed(f"{section}.lr_final_factor", self.lr_final_factor, "a number in (0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise _allowed(f"{section}.ema_decay", self.ema_decay, "a number in [0, 1) (0 = off)")
        if self.sample_every < 0 or (self.sample_every and self.sample_every % self.log_every):
            raise _allowed(
                f"{section}.sample_every", self.sample_every, f"0 (off) or a multiple of train.log_every ({self.log_every})"
            )
        if self.max_score <= 0:
            raise _allowed(f"{section}.max_score", self.max_score, "a number > 0")
        if not 0.0 < self.rollback_lr_factor < 1.0:
            raise _allowed(f"{section}.rollback_lr_factor", self.rollback_lr_factor, "a number in (0, 1)")
        if self.max_rollbacks < 0:
            raise _allowed(f"{section}.max_rollbacks", self.max_rollbacks, "an integer >= 0")
        if self.snapshots < 0:
            raise _allowed(f"{section}.snapshots", self.snapshots, "an integer >= 0 (0 = none kept)")


@dataclass(frozen=True)
class ClassifierConfig:
    seed: int = 0
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    feature_dim: int = 128  # width of the penultimate layer = FID feature space

    def validate(self, section: str) -> None:
        for name in ("epochs", "batch_size", "feature_dim"):
            if getattr(self, name) < 1:
                raise _allowed(f"{section}.{name}", getattr(self, name), "an integer >= 1")
        if self.lr <= 0:
            raise _allowed(f"{section}.lr", self.lr, "a number > 0")


@dataclass(frozen=True)
class GenerateConfig:
    seed: int = 0
    n_samples: int = 1000
    steps: int = 1000
    step_size: float = 10.0  # Langevin step size of generation (training samples with langevin.step_size)
    batch_size: int = 500
    chain_rows: int = 8
    chain_steps: tuple[int, ...] = (0, 1, 3, 5, 10, 30, 50, 100, 300, 999)
    final_steps: int = 0  # the last steps of each chain run hotter, with noise final_noise; 0 = off
    final_noise: float = 0.07
    snapshots: int = 1  # chains split evenly over the model file's last this many snapshots; 1 = the final weights

    def validate(self, section: str) -> None:
        for name in ("n_samples", "steps", "batch_size", "chain_rows", "snapshots"):
            if getattr(self, name) < 1:
                raise _allowed(f"{section}.{name}", getattr(self, name), "an integer >= 1")
        if self.step_size <= 0:
            raise _allowed(f"{section}.step_size", self.step_size, "a number > 0")
        if not 0 <= self.final_steps <= self.steps:
            raise _allowed(f"{section}.final_steps", self.final_steps, f"an integer in [0, steps ({self.steps})]")
        if self.final_noise < 0:
            raise _allowed(f"{section}.final_noise", self.final_noise, "a number >= 0")
        if self.chain_rows > self.n_samples:
            raise _allowed(f"{section}.chain_rows", self.chain_rows, f"at most n_samples ({self.n_samples})")
        bad = [s for s in self.chain_steps if not 0 <= s < self.steps]
        if not self.chain_steps or bad:
            raise _allowed(
                f"{section}.chain_steps", list(self.chain_steps), f"a non-empty list of steps in [0, {self.steps - 1}]"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    seed: int = 0
    n_noise: int = 1000  # uniform-noise images scored for the energy separation
    confidence: float = 0.9  # classifier confidence a sample must exceed to count as recognisable
    hist_bins: int = 50
    accept_share: float = 0.95  # the in/out threshold accepts this share of the held-out digits

    def validate(self, section: str) -> None:
        if self.n_noise < 2:
            raise _allowed(f"{section}.n_noise", self.n_noise, "an integer >= 2")
        if not 0.0 < self.confidence < 1.0:
            raise _allowed(f"{section}.confidence", self.confidence, "a number in (0, 1)")
        if self.hist_bins < 2:
            raise _allowed(f"{section}.hist_bins", self.hist_bins, "an integer >= 2")
        if not 0.0 < self.accept_share < 1.0:
            raise _allowed(f"{section}.accept_share", self.accept_share, "a number in (0, 1)")


OOD_CASES = ("uniform", "gaussian", "noisy", "flip", "rotate", "invert", "shrink", "shuffle", "blend")


def _check_digits(key: str, digits: tuple[int, ...]) -> None:
    if any(not 0 <= d <= 9 for d in digits) or len(set(digits)) != len(digits):
        raise _allowed(key, list(digits), "a list of distinct digits 0-9")


@dataclass(frozen=True)
class OodConfig:
    seed: int = 0
    cases: tuple[str, ...] = OOD_CASES
    n_noise: int = 1000  # images of each noise case (uniform, gaussian); the other cases transform held-out digits
    gaussian_mean: float = 0.0
    gaussian_std: float = 0.5  # N(mean, std^2) per pixel, clamped to [-1, 1]
    noisy_std: float = 0.3  # digits + N(0, std^2), clamped
    flip_exclude: tuple[int, ...] = (0, 1, 8)  # digits whose mirror image is still that digit
    rotate_exclude: tuple[int, ...] = (0,)  # digits that stay digits on their side
    shrink_factor: float = 0.5  # digits scaled by this, centred on the background
    blend_weight: float = 0.5  # w * digit + (1 - w) * a digit of another class
    hist_bins: int = 40

    def validate(self, section: str) -> None:
        bad = [c for c in self.cases if c not in OOD_CASES]
        if not self.cases or bad or len(set(self.cases)) != len(self.cases):
            allowed = f"a non-empty list of distinct cases from {', '.join(OOD_CASES)}"
            raise _allowed(f"{section}.cases", list(self.cases), allowed)
        if self.n_noise < 1:
            raise _allowed(f"{section}.n_noise", self.n_noise, "an integer >= 1")
        if not -1.0 <= self.gaussian_mean <= 1.0:
            raise _allowed(f"{section}.gaussian_mean", self.gaussian_mean, "a number in [-1, 1]")
        for name in ("gaussian_std", "noisy_std"):
            if getattr(self, name) <= 0:
                raise _allowed(f"{section}.{name}", getattr(self, name), "a number > 0")
        _check_digits(f"{section}.flip_exclude", self.flip_exclude)
        _check_digits(f"{section}.rotate_exclude", self.rotate_exclude)
        if not 0.0 < self.shrink_factor < 1.0:
            raise _allowed(f"{section}.shrink_factor", self.shrink_factor, "a number in (0, 1)")
        if not 0.0 < self.blend_weight < 1.0:
            raise _allowed(f"{section}.blend_weight", self.blend_weight, "a number in (0, 1)")
        if self.hist_bins < 2:
            raise _allowed(f"{section}.hist_bins", self.hist_bins, "an integer >= 2")


INPAINT_REGIONS = ("top", "bottom", "left", "right", "box")
DENOISE_KINDS = ("salt_pepper", "gaussian")


@dataclass(frozen=True)
class RestoreConfig:
    seed: int = 0
    n_images: int = 500  # held-out digits damaged and restored per task (at most the split's size)
    steps: int = 200  # Langevin steps of the restoration (noise, clip, precision: the langevin section)
    step_size: float = 10.0
    inpaint_region: str = "bottom"  # top | bottom | left | right (a half) | box: set to uniform noise
    inpaint_box: int = 12  # side of the centred square blanked when inpaint_region is box
    denoise_kind: str = "salt_pepper"  # salt_pepper: a share of pixels set to -1 or 1 | gaussian: + N(0, std^2)
    denoise_share: float = 0.3
    denoise_std: float = 0.3
    figure_columns: int = 10

    def validate(self, section: str) -> None:
        for name in ("n_images", "steps", "figure_columns"):
            if getattr(self, name) < 1:
                raise _allowed(f"{section}.{name}", getattr(self, name), "an integer >= 1")
        if self.step_size <= 0:
            raise _allowed(f"{section}.step_size", self.step_size, "a number > 0")
        if self.inpaint_region not in INPAINT_REGIONS:
            raise _allowed(f"{section}.inpaint_region", self.inpaint_region, f"one of {', '.join(INPAINT_REGIONS)}")
        if not 1 <= self.inpaint_box <= 32:
            raise _allowed(f"{section}.inpaint_box", self.inpaint_box, "an integer in [1, 32]")
        if self.denoise_kind not in DENOISE_KINDS:
            raise _allowed(f"{section}.denoise_kind", self.denoise_kind, f"one of {', '.join(DENOISE_KINDS)}")
        if not 0.0 < self.denoise_share <= 1.0:
            raise _allowed(f"{section}.denoise_share", self.denoise_share, "a number in (0, 1]")
        if self.denoise_std <= 0:
            raise _allowed(f"{section}.denoise_std", self.denoise_std, "a number > 0")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    experiment: str = "ebm-mnist"
    log_model: bool = True  # log the energy network as an MLflow model

    def validate(self, section: str) -> None:
        if not self.experiment.strip():
            raise _allowed(f"{section}.experiment", self.experiment, "a non-empty name")


@dataclass(frozen=True)
class RegistryConfig:
    enabled: bool = True  # register each trained model (needs tracking.enabled)
    model_name: str = "ebm-mnist"  # the registered model in MLflow's model registry
    fid_margin: float = 5.0  # `champion` moves only to a version whose FID is at least this much lower

    def validate(self, section: str) -> None:
        # MLflow accepts most names, but a name is also part of `models:/<name>@champion` URIs.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.model_name):
            raise _allowed(f"{section}.model_name", self.model_name, "letters, digits, '.', '_' or '-'")
        if not self.fid_margin >= 0:
            raise _allowed(f"{section}.fid_margin", self.fid_margin, "a number >= 0 (FID units)")


@dataclass(frozen=True)
class Params:
    paths: PathsConfig = field(default_factory=PathsConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ood: OodConfig = field(default_factory=OodConfig)
    restore: RestoreConfig = field(default_factory=RestoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        if self.generate.snapshots > max(1, self.train.snapshots):
            raise _allowed(
                "generate.snapshots", self.generate.snapshots,
                f"at most train.snapshots ({self.train.snapshots}), the snapshots the model file keeps",
            )
        if self.buffer.size < self.train.batch_size:
            raise _allowed(
                "buffer.size", self.buffer.size, f"at least train.batch_size ({self.train.batch_size})"
            )

    def flat(self) -> dict[str, Any]:
        """Every value as ``section.key`` -> value (lists as strings), e.g. for MLflow params."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            for k, v in dataclasses.asdict(getattr(self, f.name)).items():
                out[f"{f.name}.{k}"] = list(v) if isinstance(v, tuple) else v
        return out


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation; return it in the field's type."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise _allowed(key, value, f"a list of {item_type.__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, item_type) for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise _allowed(key, value, "true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _allowed(key, value, "an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _allowed(key, value, "a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise _allowed(key, value, "a string")
        return value
    raise TypeError(f"unsupported annotation {annotation!r} for {key}")  # a bug here, not the user's


def _build(cls: type, key: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise _allowed(key, raw, "a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"params: unknown key {key}.{unknown[0]} (allowed: {', '.join(names)})")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"params: missing key {key}.{missing[0]}")
    kwargs = {}
    for name in names:
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, f"{key}.{name}" if key else name, raw[name])
        else:
            kwargs[name] = _coerce(f"{key}.{name}" if key else name, raw[name], hint)
    return cls(**kwargs)


def parse_params(raw: Any) -> Params:
    """Build and validate ``Params`` from an already-parsed YAML mapping."""
    if not isinstance(raw, dict):
        raise ConfigError("params: the file must hold a mapping of sections")
    hints = typing.get_type_hints(Params)
    names = [f.name for f in dataclasses.fields(Params)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"params: unknown section {unknown[0]} (allowed: {', '.join(names)})")
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"params: missing section {missing[0]}")
    params = Params(**{n: _build(hints[n], n, raw[n]) for n in names})
    params.validate()
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params: file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"params: {path} is not valid YAML: {first}") from None
    return parse_params(raw)


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """A copy of ``params`` with ``{"section.key": value}`` overrides applied and re-validated."""
    raw = {f.name: dataclasses.asdict(getattr(params, f.name)) for f in dataclasses.fields(params)}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in raw or key not in raw[section]:
            raise ConfigError(f"params: unknown key {dotted}")
        raw[section][key] = value
    raw = {s: {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items()} for s, sec in raw.items()}
    return parse_params(raw)

