"""Replay buffer of earlier Langevin samples, with a share of fresh uniform noise in every draw."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import BufferConfig


def uniform_noise(n: int, shape: tuple[int, ...], *, device: torch.device | str, generator: torch.Generator | None):
    """n images of uniform noise in [-1, 1]."""
    return torch.rand((n, *shape), generator=generator, device=device) * 2 - 1


class ReplayBuffer:
    """A fixed, preallocated ring of images on the training device.

    ``sample(n)`` returns n starting points: each is fresh uniform noise with probability
    ``reinit_prob`` (so the fresh count is Binomial(n, reinit_prob)), otherwise a uniformly
    drawn stored image. ``push(x)`` writes new samples over the oldest ones, as the book's
    "prepend and truncate" does. The draw needs no host synchronisation.

    ``augment_prob`` > 0 shifts that share of the stored images drawn by up to ``augment_shift``
    pixels along each axis (uniform, independently), filling the uncovered border with the
    background value -1: the chains then go on from moved digits, which helps them leave a mode
    (Du et al. 2021 augment their buffer samples). At 0 the draw is the plain one, random numbers
    included.
    """

    def __init__(
        self,
        size: int,
        image_shape: tuple[int, ...],
        reinit_prob: float,
        device: torch.device | str = "cpu",
        *,
        augment_prob: float = 0.0,
        augment_shift: int = 0,
    ) -> None:
        self.size = size
        self.image_shape = tuple(image_shape)
        self.reinit_prob = reinit_prob
        self.augment_prob = augment_prob if augment_shift > 0 else 0.0
        self.augment_shift = augment_shift
        self.device = torch.device(device)
        self.storage = torch.empty((size, *self.image_shape), device=self.device)
        self.fill = 0  # number of valid images
        self.ptr = 0  # next slot to overwrite

    @classmethod
    def from_config(cls, cfg: BufferConfig, image_shape: tuple[int, ...], device: torch.device | str) -> "ReplayBuffer":
        """The buffer a ``buffer`` params section describes (the trainer's, and the benchmark's)."""
        return cls(
            cfg.size, image_shape, cfg.reinit_prob, device,
            augment_prob=cfg.augment_prob, augment_shift=cfg.augment_shift,
        )

    def __len__(self) -> int:
        return self.fill

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        fresh = uniform_noise(n, self.image_shape, device=self.device, generator=generator)
        if self.fill == 0:
            return fresh
        idx = torch.randint(0, self.fill, (n,), generator=generator, device=self.device)
        reinit = torch.rand(n, generator=generator, device=self.device) < self.reinit_prob  # (n,)
        reinit = reinit.view(n, *([1] * len(self.image_shape)))
        stored = self.storage[idx]
        if self.augment_prob > 0:
            stored = self._shift_some(stored, generator)
        return torch.where(reinit, fresh, stored)

    def _shift_some(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Shift a random ``augment_prob`` share of ``x`` (N, C, H, W) by up to ``augment_shift`` pixels."""
        n, s = x.shape[0], self.augment_shift
        height, width = x.shape[-2:]
        offsets = torch.randint(-s, s + 1, (2, n), generator=generator, device=x.device)
        chosen = torch.rand(n, generator=generator, device=x.device) < self.augment_prob
        offsets = offsets * chosen  # the others move by (0, 0)
        padded = torch.nn.functional.pad(x, (s, s, s, s), value=-1.0)
        rows = (s - offsets[0]).view(n, 1) + torch.arange(height, device=x.device)  # (N, H): source row per output row
        cols = (s - offsets[1]).view(n, 1) + torch.arange(width, device=x.device)
        batch = torch.arange(n, device=x.device).view(n, 1, 1)
        out = padded.movedim(1, -1)[batch, rows.view(n, height, 1), cols.view(n, 1, width)]  # (N, H, W, C)
        return out.movedim(-1, 1).contiguous()

    def push(self, x: torch.Tensor) -> None:
        x = x.detach()
        n = x.shape[0]
        if n >= self.size:  # only the newest ``size`` survive
            self.storage.copy_(x[-self.size :])
            self.fill, self.ptr = self.size, 0
            return
        end = self.ptr + n
        if end <= self.size:
            self.storage[self.ptr : end] = x
        else:
            split = self.size - self.ptr
            self.storage[self.ptr :] = x[:split]
            self.storage[: n - split] = x[split:]
        self.ptr = end % self.size
        self.fill = min(self.fill + n, self.size)

    def state_dict(self) -> dict[str, Any]:
        return {"storage": self.storage.detach().cpu().clone(), "fill": self.fill, "ptr": self.ptr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        storage = state["storage"]
        if tuple(storage.shape) != tuple(self.storage.shape):
            raise ValueError(
                f"replay buffer shape {tuple(storage.shape)} in the checkpoint does not match "
                f"{tuple(self.storage.shape)} from params"
            )
        self.storage.copy_(storage.to(self.device))
        self.fill, self.ptr = int(state["fill"]), int(state["ptr"])

    def images(self) -> torch.Tensor:
        """The valid stored images (a view)."""
        return self.storage[: self.fill]
