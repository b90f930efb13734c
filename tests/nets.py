"""Small networks the tests share."""

from __future__ import annotations

import torch
from torch import nn


class ChainNet(nn.Module):
    """A network offering its layers as a chain through ``layers()``, as ``EnergyNet`` does, of any shape."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def layers(self) -> list[nn.Module]:
        return list(self.body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)
