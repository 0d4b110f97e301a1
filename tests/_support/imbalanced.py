"""Small shared pieces of the class-imbalance tests: two Gaussian classes, and a toy classifier to fine-tune."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def gaussians(rng: np.random.Generator, n0: int, n1: int, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(n0 + n1, d) rows, class 0 ~ N(0, I) and class 1 ~ N(0.8, I), shuffled; and their (n0 + n1,) labels."""
    X = np.concatenate([rng.normal(0.0, 1.0, (n0, d)), rng.normal(0.8, 1.0, (n1, d))])
    y = np.r_[np.zeros(n0, dtype=np.int64), np.ones(n1, dtype=np.int64)]
    order = rng.permutation(y.size)
    return X[order], y[order]


class ToyClassifier(nn.Module):
    """A 3-class network with a ``classifier`` layer (the fine-tuning trainer's head) over a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 1)
        self.classifier = nn.Linear(4, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, 3) logits."""
        return self.classifier(self.body(images).mean(dim=(2, 3)))
