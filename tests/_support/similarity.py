"""Row-wise cosine similarity of two batches (inputs or features), for the decode-path comparisons."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["row_cosines"]


def row_cosines(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``actual`` with the same row of ``expected``, in float64.

    Each row (an image's input tensor or features, any shape after the batch axis) is flattened first.
    """
    actual = torch.as_tensor(actual).flatten(1).to(torch.float64)
    expected = torch.as_tensor(expected).flatten(1).to(torch.float64)
    return torch.nn.functional.cosine_similarity(actual, expected, dim=1).numpy()
