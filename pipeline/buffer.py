"""Replay buffer of earlier Langevin samples, with a share of fresh uniform noise in every draw."""

from __future__ import annotations

from typing import Any

import torch


def uniform_noise(n: int, shape: tuple[int, ...], *, device: torch.device | str, generator: torch.Generator | None):
    """n images of uniform noise in [-1, 1]."""
    return torch.rand((n, *shape), generator=generator, device=device) * 2 - 1


class ReplayBuffer:
    """A fixed, preallocated ring of images on the training device.

    ``sample(n)`` returns n starting points: each is fresh uniform noise with probability
    ``reinit_prob`` (so the fresh count is Binomial(n, reinit_prob)), otherwise a uniformly
    drawn stored image. ``push(x)`` writes new samples over the oldest ones, as the book's
    "prepend and truncate" does. The draw needs no host synchronisation.
    """

    def __init__(
        self,
        size: int,
        image_shape: tuple[int, ...],
        reinit_prob: float,
        device: torch.device | str = "cpu",
    ) -> None:
        self.size = size
        self.image_shape = tuple(image_shape)
        self.reinit_prob = reinit_prob
        self.device = torch.device(device)
        self.storage = torch.empty((size, *self.image_shape), device=self.device)
        self.fill = 0  # number of valid images
        self.ptr = 0  # next slot to overwrite

    def __len__(self) -> int:
        return self.fill

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        fresh = uniform_noise(n, self.image_shape, device=self.device, generator=generator)
        if self.fill == 0:
            return fresh
        idx = torch.randint(0, self.fill, (n,), generator=generator, device=self.device)
        reinit = torch.rand(n, generator=generator, device=self.device) < self.reinit_prob  # (n,)
        reinit = reinit.view(n, *([1] * len(self.image_shape)))
        return torch.where(reinit, fresh, self.storage[idx])

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
