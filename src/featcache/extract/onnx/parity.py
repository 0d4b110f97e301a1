"""Parity of two feature runners (ONNX vs torch) on the same batch.

Per layer: the largest absolute difference, that difference relative to the
layer's largest reference magnitude, and the lowest per-sample cosine
similarity; a layer fails above the stated tolerance.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from featcache.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["LayerParity", "ParityError", "compare_layers", "format_parity", "parity_check"]

logger = logging.getLogger(__name__)


class ParityError(UserError, ValueError):
    """ONNX outputs differ from the torch outputs by more than the tolerance.

    Attributes
    ----------
    results : list of LayerParity
        Numbers of every compared layer.
    failed : list of str
        Layers above tolerance.
    """

    def __init__(self, message: str, results: Sequence["LayerParity"] = (), failed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.results = list(results)
        self.failed = list(failed)


@dataclass(frozen=True)
class LayerParity:
    """Differences between two backends on one layer.

    Attributes
    ----------
    layer : str
        Layer name.
    max_abs : float
        max |a - b| over the (B, D) outputs (a: torch reference, b: ONNX).
    max_rel : float
        ``max_abs / (max |a| + 1e-12)``: the largest error relative to the
        layer's largest reference magnitude (not elementwise).
    cosine : float
        Smallest per-sample cosine similarity between the (D,) rows of a and b
        (1.0 for two all-zero rows).
    """

    layer: str
    max_abs: float
    max_rel: float
    cosine: float


def _compare(layer: str, reference: np.ndarray, other: np.ndarray) -> tuple[LayerParity, float]:
    """Parity numbers of one layer and the reference scale max |a|."""
    a = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    b = np.asarray(other, dtype=np.float64).reshape(len(other), -1)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return LayerParity(layer, float("inf"), float("inf"), float("nan")), 0.0
    max_abs = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(a).max()) if a.size else 0.0
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = (a * b).sum(axis=1)
    both_zero = norms == 0
    cosines = np.where(both_zero, 1.0, dots / np.where(both_zero, 1.0, norms))
    cosine = float(cosines.min()) if len(cosines) else 1.0
    return LayerParity(layer, max_abs, max_abs / (scale + 1e-12), cosine), scale


def compare_layers(reference: Mapping[str, Any], candidate: Mapping[str, Any]) -> list[LayerParity]:
    """Parity numbers of every layer of two runners' outputs on the same batch.

    Parameters
    ----------
    reference, candidate : mapping of str to array
        ``{layer: (B, D) array}`` of the reference (a) and the candidate (b), same layers in the same order.

    Raises
    ------
    ParityError
        When the layer names or a layer's shapes differ.
    """
    if list(reference) != list(candidate):
        raise ParityError(f"Layer names differ: reference {list(reference)}, candidate {list(candidate)}. Hint: "
                          "compare runners with the same layers in the same order.")
    results = []
    for layer in reference:
        a, b = np.asarray(reference[layer]), np.asarray(candidate[layer])
        if a.shape != b.shape:
            raise ParityError(f"Layer {layer!r}: reference shape {a.shape} != candidate shape {b.shape}. Hint: "
                              "same pooling and input size on both sides?")
        results.append(_compare(layer, a, b)[0])
    return results


def parity_check(torch_runner: Any, onnx_runner: Any, batch: torch.Tensor, atol: float = 1e-4, rtol: float = 1e-3,
                 min_cosine: float = 0.9999) -> list[LayerParity]:
    """Run one batch through both backends and compare every layer.

    A layer passes when ``max_abs <= atol + rtol * max|a|`` (numpy.allclose
    with the layer's largest reference magnitude as scale) and its smallest
    per-sample cosine similarity is >= ``min_cosine``; see :class:`LayerParity`
    for the definitions (a = torch, the reference).

    Parameters
    ----------
    torch_runner, onnx_runner : FeatureRunner
        Callables mapping a (B, 3, S, S) batch to ``{layer: (B, D) array}``.
    batch : torch.Tensor
        (B, 3, S, S) input.
    atol, rtol : float
        Absolute and scale-relative tolerance on ``max_abs``.
    min_cosine : float
        Lowest accepted per-sample cosine similarity.

    Returns
    -------
    list of LayerParity
        One entry per layer, in the torch runner's order.

    Raises
    ------
    ParityError
        (a ValueError) naming every layer above tolerance, with its numbers,
        or the layers / shapes that do not match.
    """
    reference = torch_runner(batch)
    candidate = onnx_runner(batch)
    if list(reference) != list(candidate):
        raise ParityError(f"Layer names differ: torch {list(reference)}, onnx {list(candidate)}. Hint: export the "
                          "ONNX model from an extractor with the same layers in the same order.")
    results, failed = [], []
    for layer in reference:
        a, b = np.asarray(reference[layer]), np.asarray(candidate[layer])
        if a.shape != b.shape:
            raise ParityError(f"Layer {layer!r}: torch shape {a.shape} != onnx shape {b.shape}. Hint: same "
                              "pooling and input size on both sides?")
        result, scale = _compare(layer, a, b)
        results.append(result)
        if not (result.max_abs <= atol + rtol * scale and result.cosine >= min_cosine):
            failed.append(layer)
    table = format_parity(results)
    if failed:
        raise ParityError(
            f"ONNX differs from torch above tolerance (atol={atol:g}, rtol={rtol:g}, min_cosine={min_cosine:g}) "
            f"on layer(s) {failed}:\n{table}\nHint: the torch side should run float32 without channels_last or "
            "autocast; check the export opset and input size, or loosen the tolerance if the difference is expected.",
            results, failed)
    logger.info("Parity torch vs onnx within tolerance:\n%s", table)
    return results


def format_parity(results: Sequence[LayerParity]) -> str:
    """A small fixed-width table of parity numbers, one row per layer.

    Parameters
    ----------
    results : sequence of LayerParity
        One per layer, in the order shown.

    Returns
    -------
    str
        Header ``layer  max_abs  max_rel  cosine`` and one line per result.
    """
    width = max([len("layer"), *(len(r.layer) for r in results)])
    lines = [f"{'layer':<{width}}  {'max_abs':>9}  {'max_rel':>9}  {'cosine':>14}"]
    lines += [f"{r.layer:<{width}}  {r.max_abs:9.3g}  {r.max_rel:9.3g}  {r.cosine:14.12f}" for r in results]
    return "\n".join(lines)
