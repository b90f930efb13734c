"""A small digit classifier, trained inside the pipeline: the FID feature extractor.

No Inception weights can be downloaded here, so FID is computed in the penultimate
features of this network (as FID on MNIST commonly is, with a domain classifier).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ClassifierConfig
from pipeline.progress import Progress


class DigitClassifier(nn.Module):
    def __init__(self, feature_dim: int = 128) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 4
            nn.Flatten(),
            nn.Linear(64 * 16, feature_dim),
            nn.ReLU(),
        )
        self.out = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))  # (B, 10) logits


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels: cheap, and enough to stop 4k digits being memorised."""
    shifts = torch.randint(-2, 3, (2,), generator=generator).tolist()
    return torch.roll(x, shifts=shifts, dims=(2, 3))


def train_classifier(
    cfg: ClassifierConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    progress: str | bool = True,
    progress_seconds: float = 30.0,
) -> DigitClassifier:
    """Train on ``images`` (N, 1, 32, 32) and ``labels`` (N,); ``progress``: a mode of pipeline/progress.py."""
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = DigitClassifier(cfg.feature_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = images.shape[0]
    steps = cfg.epochs * max(1, (n + cfg.batch_size - 1) // cfg.batch_size)
    bar = Progress("classifier", steps, mode=progress, interval=progress_seconds)
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            x = _augment(images[idx], generator).to(device)
            y = labels[idx].to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            shown = bar.mode == "bar" or bar.due()  # the loss reaches the host only to be shown
            bar.update(1, {"loss": loss.item()} if shown else None)
    bar.close()
    model.eval()
    return model


@torch.no_grad()
def predict(model: DigitClassifier, images: torch.Tensor, device: torch.device, batch_size: int = 500):
    """Features (N, D), class probabilities (N, 10), both float64 on CPU."""
    feats, probs = [], []
    model.eval()
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device)
        f = model.features(x)
        feats.append(f.double().cpu())
        probs.append(torch.softmax(model.out(f), dim=1).double().cpu())
    return torch.cat(feats), torch.cat(probs)


def accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    _, probs = predict(model, images, device)
    return float((probs.argmax(1) == labels).double().mean())
