"""Contrastive divergence with a score-magnitude regulariser. Pure tensors in, tensors out."""

from __future__ import annotations

import torch


def contrastive_divergence(
    real_scores: torch.Tensor, fake_scores: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss = mean s(fake) - mean s(real) + alpha * mean(s(real)^2 + s(fake)^2).

    Minimising it raises the score of real images and lowers that of samples; the
    regulariser keeps scores near zero so they cannot drift without bound.
    """
    cdiv = fake_scores.mean() - real_scores.mean()
    reg = alpha * (real_scores.pow(2).mean() + fake_scores.pow(2).mean())
    loss = cdiv + reg
    stats = {
        "loss": loss.detach(),
        "cdiv": cdiv.detach(),
        "reg": reg.detach(),
        "real_score": real_scores.detach().mean(),
        "fake_score": fake_scores.detach().mean(),
    }
    return loss, stats
