"""Torch MLP heads: Linear-BatchNorm1d-ReLU-Dropout blocks, AdamW, early stopping on val.

torch is imported lazily (on fit, predict or load), so ``import featcache.heads`` stays
cheap for pipelines that only train linear or tree heads.

Training is seeded and leaves global state alone: the global torch RNG is forked for
the duration of ``fit`` and the intra-op thread count is set to ``n_threads`` and
restored afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from featcache.errors import ParamError
from featcache.util.compute import torch_threads

from .base import ClassifierHead, HeadBase, RegressorHead, params_dataclass
from .metrics import metric_value
from .param_types import AtLeast, Interval, Matches, NonNegative, Positive, check_declared
from .preprocessing import apply_preprocess, fit_preprocess
from .splits import Split
from .training import build_mlp, iter_batches, predict_batches, train_epochs
from .validation import check_features, require_two_classes

if TYPE_CHECKING:
    import torch

__all__ = ["MLPBase", "MLPClassifierBase", "MLPHead", "MLPRegressorBase", "MLPRegressorHead", "build_mlp",
           "train_epochs"]

log = logging.getLogger(__name__)


@params_dataclass
class MLPBase(HeadBase):
    """Shared parameters (documented in :class:`MLPHead`) and training loop of the MLP heads.

    The in-memory heads add ``pca_components``; the streamed ones
    (:mod:`~featcache.heads.streaming_mlp`) add ``chunk_rows``.
    """

    hidden_sizes: Sequence[Annotated[int, AtLeast(1)]] = (256,)
    dropout: Annotated[float, Interval(0, 1, low_closed=True)] = 0.2
    lr: Annotated[float, Positive()] = 1e-3
    weight_decay: Annotated[float, NonNegative()] = 1e-4
    batch_size: Annotated[int, AtLeast(2)] = 256
    max_epochs: Annotated[int, AtLeast(1)] = 50
    patience: Annotated[int, AtLeast(1)] = 5
    min_epoch_steps: Annotated[int, AtLeast(1)] = 4
    validation_fraction: Annotated[float, Interval(0, 1)] = 0.2
    random_state: Annotated[int, AtLeast(0)] | None = 0
    n_threads: Annotated[int, AtLeast(1)] = 2
    device: Annotated[str, Matches(r"cpu|cuda(:[0-9]+)?", "'cpu', 'cuda' or 'cuda:N'")] = "cpu"

    _none_seed = 0  # random_state=None means 0 everywhere, the hold-out split included

    def _check_params(self) -> torch.device:
        """Validate the constructor parameters; return the torch device.

        The values are checked against the rules in the fields' annotations (:func:`check_declared`; e.g.
        ``hidden_sizes``, ``pca_components``, ``device``'s spelling, ``chunk_rows`` of the streamed twins);
        what is left here is whether this machine has the CUDA device asked for.
        """
        check_declared(self)
        import torch

        device = torch.device(self.device)  # 'cpu', 'cuda' or 'cuda:N' (the field's rule)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ParamError(f"device={self.device!r} requested but CUDA is not available. Hint: use device='cpu'.")
        return device

    def _val_metrics(self, out: torch.Tensor, target: torch.Tensor, loss_fn: Any) -> tuple[float, float]:
        """(validation loss, validation score) of raw network outputs ``out``."""
        out = self.output_transform(out)
        return float(loss_fn(out, target)), self._val_score(out, target)

    def loss_function(self, device: torch.device | None = None) -> torch.nn.Module:
        """The training and validation loss: cross-entropy (classifiers) or MSE (regressors).

        Parameters
        ----------
        device : torch.device, optional
            Where the class weights live (those of ``class_weight_``, set at fit).

        Returns
        -------
        torch.nn.Module
            ``loss(output_transform(out), target)``: ``nn.CrossEntropyLoss`` on
            (B, K) logits and (B,) int64 class indices (weighted by ``class_weight_``
            when it is set: the weighted mean over the rows), or ``nn.MSELoss`` on
            (B,) predictions and (B,) standardised float32 targets.
        """
        import torch
        from torch import nn

        if not self._classification:
            return nn.MSELoss()
        weights = getattr(self, "class_weight_", None)
        return nn.CrossEntropyLoss(
            weight=None if weights is None else torch.as_tensor(weights, dtype=torch.float32, device=device))

    def _fit(self, X: Any, y: Any, X_val: Any, y_val: Any) -> None:
        """Train on train, early-stopping on val."""
        device = self._check_params()
        split = self._split(X, y, X_val, y_val)
        if split.X_fit.shape[0] < 2:
            raise ValueError(
                f"{type(self).__name__} got {split.X_fit.shape[0]} training row (n_samples=1); allowed: >= 2 "
                "(BatchNorm1d normalises over the rows of a mini-batch). Hint: pass more training rows."
            )
        n_out = self._set_targets(split.y_fit, split.y_train, split.y_val)
        if self._classification:
            require_two_classes(split.y_fit)
        self._train(split, n_out, device)

    def _train(self, split: Split, n_out: int, device: torch.device) -> None:
        """Fit scaler (+ PCA) and network; set every fitted attribute except task-specific ones."""
        import torch

        seed = int(self._seed())
        self.scaler_, self.pca_, X_fit_t = fit_preprocess(split.X_fit, self.pca_components, seed)
        y_fit, y_sel = self._encode_target(split.y_fit), self._encode_target(split.y_sel)

        def tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(a, dtype=dtype, device=device)

        y_dtype = torch.long if self._classification else torch.float32
        X_fit = tensor(X_fit_t, torch.float32)
        X_sel = tensor(apply_preprocess(split.X_sel, self.scaler_, self.pca_), torch.float32)
        t_fit, t_sel = tensor(y_fit, y_dtype), tensor(y_sel, y_dtype)
        loss_fn = self.loss_function(device)

        with torch_threads(self.n_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            module = build_mlp(X_fit.shape[1], self.hidden_sizes, n_out, self.dropout).to(device)

            def epoch_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                for rows in iter_batches(X_fit.shape[0], self.batch_size, generator):
                    rows = rows.to(device)
                    yield X_fit[rows], t_fit[rows]

            history, best_epoch, best_loss = train_epochs(
                self, module, epoch_batches, lambda m: self._val_metrics(m(X_sel), t_sel, loss_fn),
            )
        self._set_trained(module, history, best_epoch, best_loss)
        self.n_features_in_ = int(split.X_train.shape[1])

    def _set_trained(self, module: torch.nn.Module, history: list[dict[str, float]], best_epoch: int,
                     best_loss: float) -> None:
        self.module_ = module.eval()
        self.best_epoch_ = best_epoch
        self.best_params_ = {"epochs": best_epoch}
        self.history_ = history
        log.info(
            "%s: best epoch %d of %d run (val loss %.4f)", type(self).__name__, best_epoch, len(history), best_loss
        )

    def output_transform(self, out: torch.Tensor) -> torch.Tensor:
        """Raw network outputs (B, n_out) -> what the loss and the predictions take.

        Parameters
        ----------
        out : torch.Tensor
            (B, K) logits for a classifier, (B, 1) for a regressor.

        Returns
        -------
        torch.Tensor
            The logits unchanged (B, K), or the regressor's single column (B,).
        """
        return out if self._classification else out[:, 0]

    def _forward_array(self, X: np.ndarray) -> np.ndarray:
        """Network outputs (n, n_out) or (n,) for already preprocessed rows, in batches."""
        return predict_batches(self.module_, X, self.n_threads, self.output_transform)

    def _forward(self, X: Any) -> np.ndarray:
        """Network outputs for raw features, in batches, under ``n_threads``."""
        check_is_fitted(self, "module_")
        X = apply_preprocess(check_features(X, self), self.scaler_, self.pca_)
        return self._forward_array(X)


@params_dataclass
class MLPClassifierBase(ClassifierHead, MLPBase):
    """Classifier side of the MLP heads: K logits, cross-entropy, accuracy on val, softmax."""

    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        return y

    def _val_score(self, out: torch.Tensor, target: torch.Tensor) -> float:
        """Validation accuracy, or ``selection_metric`` (NaN for non-finite outputs)."""
        if self.selection_metric is None:
            return float((out.argmax(dim=1) == target).float().mean())
        if not bool(out.isfinite().all()):
            return float("nan")
        proba = out.double().softmax(dim=1).cpu().numpy()
        return metric_value("classification", self.selection_metric, target.cpu().numpy(), proba, out.shape[1])

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax probabilities, shape (n, K), float64."""
        logits = self._forward(X)
        logits = logits - logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    def predict(self, X: Any) -> np.ndarray:
        """Most probable class, shape (n,): values of ``classes_``."""
        logits = self._forward(X)
        return self.classes_[np.argmax(logits, axis=1)]


@params_dataclass
class MLPHead(MLPClassifierBase):
    """MLP classifier (cross-entropy, optionally class-weighted), early-stopped on validation loss.

    Parameters
    ----------
    hidden_sizes : sequence of int
        Widths of the Linear-BatchNorm1d-ReLU-Dropout blocks.

        Defaults (256,), batch 256, patience 5, at most 50 epochs: on 14k x 2048
        features they cost a quarter of (512,)/128/10/100 at equal or better
        accuracy (benchmarks/bench_heads.py); the best epoch comes early on cached
        features.
    dropout : float
        Dropout probability in [0, 1).
    lr, weight_decay : float
        AdamW learning rate and decoupled weight decay.
    batch_size : int
        Mini-batch size (a last batch of one row is dropped each epoch).
    max_epochs, patience : int
        Stop after ``patience`` epochs without a lower validation loss (a better
        ``selection_metric``, when set).
    selection_metric : {None, "accuracy", "balanced_accuracy", "macro_f1", "log_loss"}
        Keep the epoch of the best validation value of this metric (and count
        ``patience`` on it) instead of the lowest validation loss.
    min_epoch_steps : int
        The fewest optimiser steps an epoch counts for in ``patience`` and
        ``max_epochs``: when an epoch is fewer mini-batches (fewer than about
        ``min_epoch_steps * batch_size`` training rows; below ``batch_size`` rows
        an epoch is one step), both are multiplied by ``ceil(min_epoch_steps /
        steps)``: with the default 4, patience 10 waits at least 40 steps on any
        data (benchmarks/README.md, "The MLP on small data"). 1 counts plain epochs.
    validation_fraction : float
        Stratified hold-out of the training rows for early stopping when no
        ``X_val`` is given (no refit on the full training rows).
    pca_components : None, int or float in (0, 1)
        Feed the network this many principal components (int) or this fraction of
        explained variance (float) of the standardised features; fitted on the
        rows the network is trained on.
    n_classes : int or None
        Number of outputs K, or None for the labels seen (see :class:`~featcache.heads.base.ClassifierHead`).
    class_weight : {None, "balanced"}
        ``"balanced"``: a weighted cross-entropy, each class weighing
        ``n_samples / (n_classes * count)`` over the rows the network is trained
        on; the validation loss of early stopping is weighted the same way.
    random_state : int or None
        Seed of initialisation, dropout, shuffling, the PCA solver and the hold-out
        (None means 0 for all of them: two fits with None are identical).
    n_threads : int
        torch intra-op threads during fit and predict (restored afterwards).
    device : str
        torch device for training and prediction.

    Attributes
    ----------
    module_ : torch.nn.Sequential
        The network at its best epoch, in eval mode.
    scaler_ : StandardScaler
        Fitted on the rows the network is trained on.
    pca_ : PCA or None
        Fitted on the scaled training rows; None without ``pca_components``.
    best_epoch_ : int
        1-based epoch of the lowest validation loss (best ``selection_metric``).
    history_ : list of dict
        ``epoch``, ``train_loss``, ``val_loss``, ``val_score`` (accuracy, or ``selection_metric``) per epoch.
    best_params_ : dict
        ``{"epochs": best_epoch_}``.
    classes_ : ndarray of shape (K,)
    class_weight_ : ndarray of shape (K,) or None
        The cross-entropy's class weights (None: unweighted).
    n_features_in_ : int
    fit_seconds_ : float
    """

    pca_components: Annotated[int, AtLeast(1)] | Annotated[float, Interval(0, 1)] | None = None


@params_dataclass
class MLPRegressorBase(RegressorHead, MLPBase):
    """Regressor side of the MLP heads: one output, MSE on the standardised target, R2 on val."""

    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        return self._scale_target(y)

    def _val_score(self, out: torch.Tensor, target: torch.Tensor) -> float:
        """Validation R2, or ``selection_metric`` in target units (NaN for non-finite outputs)."""
        if self.selection_metric is not None:
            if not bool(out.isfinite().all()):
                return float("nan")
            pred, y = (self._unscale_target(t.double().cpu().numpy()) for t in (out, target))
            return metric_value("regression", self.selection_metric, y, pred)
        ss_res = float(((out - target) ** 2).sum())
        ss_tot = float(((target - target.mean()) ** 2).sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted targets, shape (n,), float64."""
        return self._unscale_target(self._forward(X))


@params_dataclass
class MLPRegressorHead(MLPRegressorBase):
    """MLP regressor: MSE on the standardised target, un-standardised at predict.

    Parameters are those of :class:`MLPHead` without ``n_classes``; the hold-out
    (when no ``X_val`` is given) is a plain random one.

    Attributes
    ----------
    module_, scaler_, pca_, best_epoch_, best_params_, n_features_in_, fit_seconds_
        As in :class:`MLPHead`.
    history_ : list of dict
        ``val_score`` is the validation R2.
    y_mean_, y_scale_ : float
        Target standardisation, from the training rows.
    """

    pca_components: Annotated[int, AtLeast(1)] | Annotated[float, Interval(0, 1)] | None = None
