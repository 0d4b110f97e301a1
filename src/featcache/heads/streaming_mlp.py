"""Streamed MLP heads: the MLP of :mod:`~featcache.heads.mlp` trained chunk by chunk.

Each epoch visits the training row chunks (numpy slices or dask blocks, see
:class:`~featcache.heads.chunks.RowChunks`) in a seeded random order, cuts each
chunk into shuffled mini-batches and feeds them to the same training loop as the
in-memory heads (:func:`~featcache.heads.training.train_epochs`); the scaler is
fitted in one streaming pass and the validation loss is accumulated over streamed
validation chunks. Only one chunk of features is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from sklearn.utils.validation import check_is_fitted

from featcache.util.compute import torch_threads

from .base import params_dataclass
from .chunks import DEFAULT_CHUNK_ROWS, stream_outputs, streaming_sources
from .mlp import MLPClassifierBase, MLPRegressorBase
from .param_types import AtLeast
from .preprocessing import fit_scaler_streaming
from .training import build_mlp, iter_batches, train_epochs

if TYPE_CHECKING:
    import torch

__all__ = ["StreamingMLPHead", "StreamingMLPRegressorHead"]


@params_dataclass
class _StreamingMLPMixin:
    """The ``chunk_rows`` parameter and streamed fitting/prediction of the MLP twins.

    Training loop: :func:`~featcache.heads.training.train_epochs`, as in memory.
    """

    chunk_rows: Annotated[int, AtLeast(1)] = DEFAULT_CHUNK_ROWS

    _streaming = True

    def _fit(self, X: Any, y: Any, X_val: Any, y_val: Any) -> None:
        """Train on mini-batches of the streamed training chunks, early-stopping on the val chunks."""
        import torch

        device = self._check_params()
        train, val = streaming_sources(self, X, y, X_val, y_val, random_state=self._seed())
        n_out = self._set_targets(train.served_y, train.y, val.y)
        self.scaler_, self.pca_ = fit_scaler_streaming(train), None
        seed = int(self._seed())
        y_dtype = torch.long if self._classification else torch.float32
        loss_fn = self.loss_function(device)

        def tensors(Xc: np.ndarray, yc: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.as_tensor(self.scaler_.transform(Xc), dtype=torch.float32, device=device)
            return x, torch.as_tensor(self._encode_target(yc), dtype=y_dtype, device=device)

        with torch_threads(self.n_threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            generator = torch.Generator().manual_seed(seed)
            rng = np.random.default_rng(seed)
            module = build_mlp(train.n_features, self.hidden_sizes, n_out, self.dropout).to(device)

            def epoch_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
                for Xc, yc in train.iter(rng.permutation(len(train))):
                    x, t = tensors(Xc, yc)
                    for rows in iter_batches(x.shape[0], self.batch_size, generator):
                        if rows.numel() > 1:  # BatchNorm needs two rows
                            rows = rows.to(device)
                            yield x[rows], t[rows]

            def validate(m: torch.nn.Module) -> tuple[float, float]:
                outs, targets = zip(*((m(x), t) for x, t in (tensors(Xc, yc) for Xc, yc in val)))
                return self._val_metrics(torch.cat(outs), torch.cat(targets), loss_fn)

            history, best_epoch, best_loss = train_epochs(self, module, epoch_batches, validate)
        self._set_trained(module, history, best_epoch, best_loss)
        self.n_features_in_ = train.n_features

    def _forward(self, X: Any) -> np.ndarray:
        """Network outputs, streamed chunk by chunk (numpy or dask ``X``)."""
        check_is_fitted(self, "module_")
        return stream_outputs(self, X, self._forward_array)


@params_dataclass
class StreamingMLPHead(_StreamingMLPMixin, MLPClassifierBase):
    """:class:`~featcache.heads.mlp.MLPHead` trained on mini-batches streamed chunk by chunk.

    Parameters are those of :class:`~featcache.heads.mlp.MLPHead` (without
    ``pca_components``) plus ``chunk_rows`` (rows per chunk of an in-memory ``X``).
    Each epoch visits the training chunks in a seeded random order and cuts each
    chunk into shuffled mini-batches; the scaler is fitted in one streaming pass.
    Attributes are those of :class:`~featcache.heads.mlp.MLPHead` (``pca_`` is None); ``class_weight="balanced"``
    counts the classes of the training rows (after the hold-out), as the in-memory head does.
    """


@params_dataclass
class StreamingMLPRegressorHead(_StreamingMLPMixin, MLPRegressorBase):
    """:class:`~featcache.heads.mlp.MLPRegressorHead` trained on streamed mini-batches.

    Parameters as :class:`StreamingMLPHead` without ``n_classes``; attributes as
    :class:`~featcache.heads.mlp.MLPRegressorHead`.
    """
