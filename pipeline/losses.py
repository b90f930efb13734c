"""The training losses: contrastive divergence with a score-magnitude regulariser (pure tensors in,
tensors out), and the sampler's KL term, which takes the network and calls it."""

from __future__ import annotations

import torch

from pipeline.model import frozen


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


def sampler_kl(
    model: torch.nn.Module,
    x: torch.Tensor,
    *,
    step_size: float,
    grad_clip: float,
    compare: torch.Tensor | None = None,
    repel: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KL term of Du et al. (2021, "Improved Contrastive Divergence Training of EBMs").

    The contrastive loss treats the samples as constants, so it never asks the sampler to
    produce good samples. Here one more sampler step is taken from ``x`` (the chains' ends,
    detached) with its graph kept, so the moved images depend on the weights through the input
    gradient; the loss is their energy under the *frozen* weights, minus ``repel`` times a
    nearest-neighbour entropy estimate (the mean log distance of each moved image to its nearest
    image in ``compare``, earlier samples). Minimising it trains the weights so that a step of the
    sampler climbs the score and spreads the samples apart; its gradient reaches the weights only
    through the step. ``model`` is the network with trainable weights, called as a function of
    the images.
    """
    x = x.detach().requires_grad_(True)
    grad = torch.autograd.grad(model(x).sum(), x, create_graph=True)[0]
    if grad_clip > 0:
        grad = grad.clamp(-grad_clip, grad_clip)
    moved = (x + step_size * grad).clamp(-1, 1)
    with frozen(model):  # the energy of the moved images; the weights act only through the step
        kl = -model(moved).mean()
    stats = {"kl": kl.detach()}
    loss = kl
    if repel > 0 and compare is not None and compare.shape[0] > 0:
        nearest = torch.cdist(moved.flatten(1), compare.detach().flatten(1).to(moved.dtype)).min(dim=1).values
        entropy = nearest.clamp_min(1e-6).log().mean()
        loss = loss - repel * entropy
        stats["repel_entropy"] = entropy.detach()
    return loss, stats
