"""Contrastive-divergence training: batch, buffer draw, Langevin, loss, step, log.

The trainer owns the loop and its safety nets: periodic atomic checkpoints (model, optimizer,
replay buffer, step, every RNG state), resume after a kill, save-and-exit on SIGINT/SIGTERM,
and rollback with a lower learning rate when the scores diverge.

Under torchrun it trains data-parallel (see ``pipeline/distributed.py``): each rank has its own
data shard, buffer and chains; the CD loss runs through DistributedDataParallel; statistics are
averaged over ranks before every decision; rank 0 writes the checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.buffer import ReplayBuffer
from pipeline.checkpoint import CHECKPOINT_FORMAT, CheckpointError, atomic_save, rng_state, safe_load, set_rng_state
from pipeline.config import LangevinConfig, Params, TrainConfig
from pipeline.data import DataError
from pipeline.distributed import SINGLE, Dist
from pipeline.langevin import sample, score_in_precision
from pipeline.losses import contrastive_divergence, sampler_kl
from pipeline.model import IMAGE_SHAPE, EnergyNet, frozen, normalize_spectral_
from pipeline.progress import Progress
from pipeline.runtime import resolve_precision

LOGGED = ("loss", "cdiv", "reg", "kl", "repel_entropy", "real_score", "fake_score", "grad_norm", "buffer_fill")
SHOWN = (("loss", "loss"), ("real_score", "real score"), ("fake_score", "fake score"))  # in progress lines


class TrainingDiverged(RuntimeError):
    """Scores kept diverging after every allowed rollback."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved first."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        super().__init__(f"train: stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved to {path}")
        self.signum = signum


def steps_per_epoch(n_images: int, world_size: int, batch_size: int) -> int:
    """Full batches per epoch and process; a ``DataError`` (one line) if there is not even one."""
    steps = (n_images // world_size) // batch_size
    if steps < 1:
        raise DataError(
            f"train: {n_images} training images over {world_size} process(es) are fewer than one batch "
            f"(train.batch_size={batch_size}) per process; lower train.batch_size or use more data "
            f"(data.limit, data.source)"
        )
    return steps


def cd_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    buffer: ReplayBuffer,
    real: torch.Tensor,
    *,
    langevin_cfg: LangevinConfig,
    train_cfg: TrainConfig,
    generator: torch.Generator,
    score_fn: Callable | None = None,
) -> dict[str, torch.Tensor]:
    """One contrastive-divergence update; returns detached statistics (no host sync).

    ``model`` may be DistributedDataParallel: the loss then runs through it, so the weight
    gradients are averaged over ranks, while the sampler scores with the module inside.
    """
    n = real.shape[0]
    score_fn = score_fn or getattr(model, "module", model)
    real = (real + train_cfg.real_noise * torch.randn(real.shape, generator=generator, device=real.device)).clamp(-1, 1)
    x0 = buffer.sample(n, generator)  # (n, 1, 32, 32)
    sync = getattr(score_fn, "sync", None)
    if sync is not None:
        sync()  # a low-precision copy of the weights follows the last optimizer step
    with frozen(model):  # important: Langevin must not touch the weights' gradients
        fake, _ = sample(score_fn, x0, langevin_cfg, generator=generator)
    compare = None
    if train_cfg.kl_weight > 0 and train_cfg.kl_repel > 0 and len(buffer) > 0:  # earlier samples, drawn before the push
        compare = buffer.images()[torch.randint(0, len(buffer), (train_cfg.kl_compare,), generator=generator, device=real.device)]
    buffer.push(fake, generator)  # draws random numbers only with the reservoir policy
    scores = model(torch.cat([real, fake]))  # (2n,): split by count, never by halves of a short batch
    real_scores, fake_scores = scores[:n], scores[n:]
    loss, stats = contrastive_divergence(real_scores, fake_scores, train_cfg.alpha)
    if train_cfg.kl_weight > 0:
        kl_loss, kl_stats = sampler_kl(
            getattr(model, "module", model), fake[: train_cfg.kl_chains],
            step_size=langevin_cfg.step_size, grad_clip=langevin_cfg.grad_clip, compare=compare, repel=train_cfg.kl_repel,
        )
        loss = loss + train_cfg.kl_weight * kl_loss
        stats.update(kl_stats)
        stats["loss"] = loss.detach()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = train_cfg.weight_grad_clip if train_cfg.weight_grad_clip > 0 else math.inf
    stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).detach()
    stats["max_abs_score"] = scores.detach().abs().max()
    optimizer.step()
    if train_cfg.spectral_norm:
        normalize_spectral_(getattr(model, "module", model))  # every rank holds the same weights: the same result
    return stats


@dataclass
class TrainResult:
    model: EnergyNet
    history: list[dict[str, float]]
    steps: int
    seconds: float
    rollbacks: int
    run_id: str | None
    buffer: ReplayBuffer
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def fingerprint(params: Params, data_digest: str) -> str:
    """What must match for a checkpoint to be resumed: every training input.

    The device and the sampler's precision are left out as written (``auto`` may resolve
    differently on another machine); the checkpoint records what they resolved to, and
    ``Trainer.try_resume`` compares that.
    """
    relevant = {
        s: dataclasses.asdict(getattr(params, s)) for s in ("data", "model", "langevin", "buffer", "train", "runtime")
    }
    relevant["runtime"].pop("device")
    relevant["runtime"].pop("progress_seconds")  # how often progress is shown changes no result
    relevant["langevin"].pop("precision")
    relevant["langevin"].pop("kernels")  # the same gradient, up to the order of its sums
    relevant["data_digest"] = data_digest
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=list).encode()).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


class Trainer:
    def __init__(
        self,
        params: Params,
        images: torch.Tensor,
        device: torch.device,
        tracker: Any,
        checkpoint_path: str | Path,
        progress: str | bool = True,
        step_fn: Callable[..., dict[str, torch.Tensor]] = cd_step,
        dist: Dist = SINGLE,
    ) -> None:
        self.params, self.cfg = params, params.train
        self.device, self.tracker = device, tracker
        self.progress = progress  # a mode of pipeline/progress.py: bar, lines or off (True: bar)
        self.step_fn = step_fn
        self.dist = dist
        self.checkpoint_path = Path(checkpoint_path)
        self.images = images.to(device)  # (N, 1, 32, 32)
        self.steps_per_epoch = steps_per_epoch(self.images.shape[0], dist.world_size, self.cfg.batch_size)  # per rank
        self.total_steps = self.cfg.epochs * self.steps_per_epoch
        self.fingerprint = fingerprint(params, tensor_digest(images))
        dist.check_same(self.fingerprint, "params or training data")
        torch.manual_seed(self.cfg.seed)
        self.model = EnergyNet.from_config(params.model).to(device)
        if self.cfg.spectral_norm:
            normalize_spectral_(self.model)  # the first chains already sample the normalised network
        self.step_model = dist.wrap(self.model)  # what the CD loss runs through: DDP under torchrun
        self.optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.cfg.lr, betas=(self.cfg.beta1, self.cfg.beta2)
        )
        self.buffer = ReplayBuffer.from_config(params.buffer, IMAGE_SHAPE, device)
        self.generator = torch.Generator(device=device).manual_seed(self.cfg.seed + dist.rank)
        # The sampler's arithmetic: `auto` is bf16 only where the hardware runs it natively.
        self.precision = resolve_precision(params.langevin.precision, device)
        self.score_fn = score_in_precision(self.model, self.precision, params.langevin.kernels)
        self.kernels = self.score_fn.kernels  # compiled or aten: what takes the sampler's input gradient
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.rollbacks = 0
        self.lr_scale = 1.0
        # The weights generation samples with: an exponential moving average of the trained ones, or those.
        self.ema = EnergyNet.from_config(params.model).to(device) if self.cfg.ema_decay > 0 else None
        if self.ema is not None:
            self.ema.load_state_dict(self.model.state_dict())
            self.ema.requires_grad_(False)
        # Copies of the sampling weights over the last iterations (train.snapshots, train.snapshot_every), as
        # (step, state dict on the CPU): generation can split its chains over them (generate.snapshots).
        self.snapshots: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._signal: int | None = None
        # Checking the statistics needs a host sync: free on the CPU, so every step there; elsewhere
        # (a GPU) only at log and checkpoint steps, so the device never waits for the host in between.
        self.check_every_step = device.type == "cpu"
        self._bar: Progress | None = None

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step`` (0-based): the schedule times the rollback factor."""
        lr = self.cfg.lr * self.lr_scale
        if self.cfg.lr_schedule == "cosine" and self.total_steps > 1:
            final = self.cfg.lr_final_factor
            lr *= final + (1 - final) * 0.5 * (1 + math.cos(math.pi * step / (self.total_steps - 1)))
        return lr

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        """ema <- d ema + (1 - d) weights, with d warming up as (1 + step) / (10 + step) towards ema_decay."""
        if self.ema is None:
            return
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))
        ema, live = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema, live, 1.0 - decay)

    def sampling_model(self) -> EnergyNet:
        """The network generation and evaluation use: the EMA when ``train.ema_decay`` > 0."""
        return self.ema if self.ema is not None else self.model

    def snapshot_due(self, done: int) -> bool:
        """Whether the weights after ``done`` updates are one of the ``train.snapshots`` kept: every
        ``snapshot_every`` updates back from the last one, which is always kept."""
        to_go = self.total_steps - done
        every = self.cfg.snapshot_every
        return 0 <= to_go < self.cfg.snapshots * every and to_go % every == 0

    @torch.no_grad()
    def take_snapshot(self, done: int) -> None:
        state = {k: v.detach().cpu().clone() for k, v in self.sampling_model().state_dict().items()}
        self.snapshots = [s for s in self.snapshots if s[0] < done] + [(done, state)]

    # ------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "resolved": {"device": self.device.type, "precision": self.precision},
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "buffer": self.buffer.state_dict(),
            "rng": rng_state({"train": self.generator}),
            "history": self.history,
            "rollbacks": self.rollbacks,
            "lr_scale": self.lr_scale,
            "snapshots": self.snapshots,
            "run_id": getattr(self.tracker, "run_id", None),
            "world_size": self.dist.world_size,
        }

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; in a distributed run it holds every rank's buffer and RNG states."""
        state = self.state_dict()
        if self.dist.enabled:
            state["ranks"] = self.dist.gather({"buffer": state["buffer"], "rng": state["rng"]})
        if self.dist.is_main:
            atomic_save(state, self.checkpoint_path)

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        same_device = (state.get("resolved") or {}).get("device", self.device.type) == self.device.type
        if state["rng"] is not None and same_device:
            set_rng_state(state["rng"], {"train": self.generator})
        elif state["rng"] is not None:  # another device's generator state does not fit this one's
            self.generator.manual_seed(self._reseed(int(state["step"])))
        else:  # a rank the checkpoint has no state for: it was written by fewer processes
            self.generator.manual_seed(self.cfg.seed + self.dist.rank)
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.rollbacks = int(state["rollbacks"])
        self.lr_scale = float(state["lr_scale"])
        self.snapshots = [(int(step), weights) for step, weights in state.get("snapshots", [])]

    def _read_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint, if it belongs to this exact configuration and data, with this rank's own states.

        In a distributed run rank 0 reads the file and hands every rank its part.
        """

        def read() -> dict[str, Any] | None:
            if not self.checkpoint_path.is_file():
                return None
            state = safe_load(self.checkpoint_path, CHECKPOINT_FORMAT)
            return state if state.get("fingerprint") == self.fingerprint else None

        return self.dist.share_state(read)

    def try_resume(self) -> bool:
        """Resume from the checkpoint if it belongs to this exact configuration and data.

        A checkpoint whose sampler ran in another precision stops the run (mixing precisions
        within one run would make it neither): ``CheckpointError``, one line. One written on
        another device type carries over: weights, optimizer, replay buffer and step move to this
        device; its random-number state cannot, so the generator is reseeded from the seed and
        the step, deterministically, and a line says so.
        """
        state = self._read_checkpoint()
        if state is None:
            return False
        resolved = state.get("resolved") or {}
        precision = resolved.get("precision", self.precision)
        if precision != self.precision:
            raise CheckpointError(
                f"train: the checkpoint {self.checkpoint_path} sampled in {precision}, but langevin.precision="
                f"{self.params.langevin.precision} is {self.precision} here; set langevin.precision: {precision} "
                f"to resume it, or delete the checkpoint to start over"
            )
        device_type = resolved.get("device", self.device.type)
        self.load_state(state)
        if device_type != self.device.type:
            if self.dist.is_main:
                print(
                    f"train: the checkpoint was written on {device_type}, resuming on {self.device.type}: weights, "
                    f"optimizer and replay buffer carry over; the random numbers restart from seed "
                    f"{self._reseed(self.step)} (train.seed and step {self.step})",
                    file=sys.stderr,
                )
        return True

    def _reseed(self, step: int) -> int:
        """A generator seed derived from ``train.seed``, the rank and ``step`` (a cross-device resume)."""
        return (self.cfg.seed * 1_000_003 + step) * 1_009 + self.dist.rank

    @staticmethod
    def checkpoint_run_id(path: str | Path) -> str | None:
        path = Path(path)
        if not path.is_file():
            return None
        return safe_load(path, CHECKPOINT_FORMAT).get("run_id")

    # ------------------------------------------------------------ loop

    def _batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if getattr(self, "_perm_epoch", None) != epoch:
            # The order of each epoch depends on (seed, epoch) only, so a resumed run sees the same batches;
            # each rank takes its disjoint share of it.
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm = self.dist.shard(torch.randperm(self.images.shape[0], generator=g)).to(self.device)
            self._perm_epoch = epoch
        idx = self._perm[i * self.cfg.batch_size : (i + 1) * self.cfg.batch_size]  # drop the short tail
        return self.images[idx]

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self._signal = signum

    def _rollback(self, step: int, stats: dict[str, float]) -> None:
        self.rollbacks += 1
        detail = f"loss={stats['loss']:.4g}, max |score|={stats['max_abs_score']:.4g}"
        if self.rollbacks > self.cfg.max_rollbacks:
            raise TrainingDiverged(
                f"train: diverged at step {step} ({detail}) after {self.cfg.max_rollbacks} rollbacks; "
                f"lower train.lr or langevin.step_size"
            )
        rollbacks, lr_scale = self.rollbacks, self.lr_scale * self.cfg.rollback_lr_factor
        state = self._read_checkpoint()
        if state is None:
            raise CheckpointError(f"train: no checkpoint of this run at {self.checkpoint_path} to roll back to")
        self.load_state(state)
        self.rollbacks, self.lr_scale = rollbacks, lr_scale
        message = (
            f"train: divergence at step {step} ({detail}); rolled back to step {self.step}, "
            f"lr now {self.lr_at(self.step):.3g} (rollback {self.rollbacks}/{self.cfg.max_rollbacks})"
        )
        if self.dist.is_main:
            if self._bar is not None:
                self._bar.write(message)
            else:
                print(message, file=sys.stderr)
        self.tracker.log_metrics({"rollback": float(self.rollbacks), "lr": self.lr_at(self.step)}, step=step)
        self.tracker.set_tags({f"rollback.{self.rollbacks}": message})
        self.save_checkpoint()  # the lowered lr and the rollback count survive a later kill

    def fit(self, on_log: Callable[[int, "Trainer"], None] | None = None) -> TrainResult:
        resumed_from = self.step
        if self.step == 0 and not self.dist.on_main(self.checkpoint_path.is_file, share=True):
            self.save_checkpoint()  # a rollback target exists from the first step on
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        start = time.perf_counter()
        bar = self._bar = Progress(
            "train", self.total_steps, mode=self.progress, interval=self.params.runtime.progress_seconds,
            initial=self.step,
        )
        shown: dict[str, float] = {}  # the latest statistics the host has seen, for the progress display
        try:
            while self.step < self.total_steps:
                step = self.step
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr_at(step)
                stats = self.step_fn(
                    self.step_model,
                    self.optimizer,
                    self.buffer,
                    self._batch(step),
                    langevin_cfg=self.params.langevin,
                    train_cfg=self.cfg,
                    generator=self.generator,
                    score_fn=self.score_fn,
                )
                done = step + 1
                is_log = done % self.cfg.log_every == 0 or done == self.total_steps
                is_ckpt = done % self.cfg.checkpoint_every == 0 or done == self.total_steps
                stop = self._signal is not None
                if is_log or is_ckpt or self.check_every_step:
                    values = {k: float(v) for k, v in stats.items()}
                    # Distributed: means over ranks, and a stop if any rank was signalled, so all decide alike.
                    values, stop = self.dist.reduce_stats(values, step=done, stop=stop)
                    if not all(math.isfinite(v) for v in values.values()) or values["max_abs_score"] > self.cfg.max_score:
                        self._rollback(step, values)
                        bar.moveto(self.step)
                        continue
                    shown = {label: values[key] for key, label in SHOWN if key in values}
                else:
                    if self.dist.enabled:
                        stop = False  # ranks act on a signal only where they have agreed on it
                    if bar.due():  # a progress line now: this process's latest statistics (one host sync)
                        shown = {label: float(stats[key]) for key, label in SHOWN if key in stats}
                self.update_ema(step)
                self.step = done
                if self.snapshot_due(done):
                    self.take_snapshot(done)
                bar.update(1, shown)
                if is_log:
                    row = {"step": done, **{k: values[k] for k in LOGGED if k in values}, "lr": self.lr_at(step)}
                    row["buffer_fill"] = float(len(self.buffer))
                    self.history.append(row)
                    self.tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=done)
                    if on_log is not None:
                        on_log(done, self)
                if is_ckpt:
                    self.save_checkpoint()
                if stop:
                    self.save_checkpoint()
                    raise TrainingInterrupted(self._signal or signal.SIGTERM, self.step, self.checkpoint_path)
        finally:
            bar.close()
            self._bar = None
            for s, h in old_handlers.items():
                signal.signal(s, h)
        return TrainResult(
            model=self.sampling_model(),
            history=self.history,
            steps=self.step,
            seconds=time.perf_counter() - start,
            rollbacks=self.rollbacks,
            run_id=getattr(self.tracker, "run_id", None),
            buffer=self.buffer,
            resumed_from=resumed_from,
        )


__all__ = ["Trainer", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "cd_step"]
