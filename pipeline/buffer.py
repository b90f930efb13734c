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

    ``policy="reservoir"`` keeps instead a uniform random sample of every image ever pushed
    (reservoir sampling, as Du et al. 2021's buffer): once full, the t-th image pushed (0-based)
    takes a uniformly chosen slot with probability size / (t + 1), so samples from every stage of
    training stay in the draw. Its push draws random numbers from the generator it is given and
    waits for the host once (to resolve slots chosen twice in one push: the later image wins).
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
        policy: str = "fifo",
    ) -> None:
        if policy not in ("fifo", "reservoir"):
            raise ValueError(f"replay buffer policy {policy!r}: expected fifo or reservoir")
        self.policy = policy
        self.size = size
        self.image_shape = tuple(image_shape)
        self.reinit_prob = reinit_prob
        self.augment_prob = augment_prob if augment_shift > 0 else 0.0
        self.augment_shift = augment_shift
        self.device = torch.device(device)
        self.storage = torch.empty((size, *self.image_shape), device=self.device)
        self.fill = 0  # number of valid images
        self.ptr = 0  # next slot to overwrite (fifo)
        self.seen = 0  # images pushed so far (reservoir)

    @classmethod
    def from_config(cls, cfg: BufferConfig, image_shape: tuple[int, ...], device: torch.device | str) -> "ReplayBuffer":
        """The buffer a ``buffer`` params section describes (the trainer's, and the benchmark's)."""
        return cls(
            cfg.size, image_shape, cfg.reinit_prob, device,
            augment_prob=cfg.augment_prob, augment_shift=cfg.augment_shift, policy=cfg.policy,
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

    def push(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Store ``x`` (N, C, H, W): over the oldest images (fifo), or by reservoir sampling."""
        x = x.detach()
        if self.policy == "reservoir":
            self._push_reservoir(x, generator)
            return
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

    def _push_reservoir(self, x: torch.Tensor, generator: torch.Generator | None) -> None:
        n = x.shape[0]
        t = self.seen + torch.arange(n, device=self.device)  # how many were pushed before each image
        slot = (torch.rand(n, generator=generator, device=self.device) * (t + 1)).long().clamp_(max=t)
        slot = torch.where(t < self.size, t, slot)  # the first ``size`` images fill the buffer in order
        kept = slot < self.size
        order = torch.arange(n, device=self.device)
        last = torch.full((self.size,), -1, dtype=torch.long, device=self.device)
        last.scatter_reduce_(0, slot[kept], order[kept], reduce="amax")  # a slot chosen twice keeps the later image
        slots = (last >= 0).nonzero().squeeze(1)
        self.storage[slots] = x[last[slots]]
        self.seen += n
        self.fill = min(self.seen, self.size)

    def state_dict(self) -> dict[str, Any]:
        return {"storage": self.storage.detach().cpu().clone(), "fill": self.fill, "ptr": self.ptr, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        storage = state["storage"]
        if tuple(storage.shape) != tuple(self.storage.shape):
            raise ValueError(
                f"replay buffer shape {tuple(storage.shape)} in the checkpoint does not match "
                f"{tuple(self.storage.shape)} from params"
            )
        self.storage.copy_(storage.to(self.device))
        self.fill, self.ptr = int(state["fill"]), int(state["ptr"])
        self.seen = int(state.get("seen", self.fill))  # checkpoints before the reservoir policy: as many as stored

    def images(self) -> torch.Tensor:
        """The valid stored images (a view)."""
        return self.storage[: self.fill]
