"""ONNX runner: run a file written by :func:`~featcache.extract.onnx.export.export_onnx` with onnxruntime.

:class:`OnnxFeatureRunner` reads everything it needs (layer names and specs,
input size) from the file's featcache metadata and implements the engine's
``FeatureRunner`` protocol: ``runner(batch)`` returns ``{layer: (B, D) array}``.
:meth:`OnnxFeatureRunner.from_source` opens a cached export of a backbone's
weights without building the model (exporting it on a cache miss);
:meth:`OnnxFeatureRunner.from_model` exports a model in hand.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import onnxruntime as ort

from featcache.errors import UserError
from featcache.extract.onnx.cache import (
    cached_export,
    lookup,
    read_only_lookup,
    resolve_cache_dir,
    source_key,
    writable_cache_dir,
)
from featcache.extract.onnx.format import DEFAULT_OPSET, EXPORT_KEY, LAYERS_KEY
from featcache.extract.zoo.registry import BackboneSpec
from featcache.store.schema import LayerSpec
from featcache.util.atomic import atomic_path
from featcache.util.compute import physical_cores
from featcache.util.hashing import file_sha256

if TYPE_CHECKING:  # torch is imported only to build a model or export one: a cached export runs without it
    import torch
    from torch import nn

    from featcache.extract.zoo.weights import LoadedBackbone, WeightsSource

__all__ = ["OnnxFeatureRunner", "OnnxModelError", "OnnxModelNotFoundError"]

logger = logging.getLogger(__name__)

#: onnxruntime's exception classes (InvalidProtobuf: not a protobuf; InvalidArgument: one without a graph).
_ORT_ERRORS = ort.capi.onnxruntime_pybind11_state

#: How to get an ONNX file the runner reads: featcache's export (it writes the metadata the runner needs).
_EXPORT_HINT = "Hint: write it with `featcache export-onnx` (featcache.extract.onnx.export.export_onnx)."


class OnnxModelError(UserError, ValueError):
    """An ONNX file :class:`OnnxFeatureRunner` cannot run: not an ONNX model, or not exported by featcache."""


class OnnxModelNotFoundError(OnnxModelError, FileNotFoundError):
    """The ONNX file does not exist (an :class:`OnnxModelError` and a FileNotFoundError)."""

_DEVICES = ("cpu", "cuda")
_CPU = "CPUExecutionProvider"
_CUDA = "CUDAExecutionProvider"


def _parse_device(device: str | torch.device) -> tuple[str, int]:
    """``cpu``, ``cuda`` or ``cuda:N`` (a string or a torch.device) -> (type, index), without importing torch."""
    kind, _, index = str(device).partition(":")
    if kind not in _DEVICES or (index and (not index.isdigit() or kind == "cpu")):
        raise ValueError(f"device {device!r} is not one of {_DEVICES} (optionally 'cuda:N'). "
                         "Hint: 'cuda' needs the onnxruntime-gpu package (pip install 'featcache[gpu]').")
    return kind, int(index or 0)


class OnnxFeatureRunner:
    """Run an ONNX file written by :func:`~featcache.extract.onnx.export.export_onnx` with onnxruntime.

    Implements the engine's ``FeatureRunner`` protocol: ``runner(batch)``
    returns ``{layer: (B, D) float32 array}``.

    Parameters
    ----------
    path : path-like
        The ``.onnx`` file (with featcache metadata).
    device : {"cpu", "cuda"} or "cuda:N"
        ``cuda`` uses the CUDA execution provider (package onnxruntime-gpu)
        with the CPU provider as fallback for unsupported nodes; when the
        CUDA provider is not installed a warning is logged and the CPU is used.
    intra_op_threads : int, optional
        Threads of one operator; default :func:`physical_cores`.

    Attributes
    ----------
    path : Path
        The model file.
    provider : str
        The execution provider actually used (``session.get_providers()[0]``).
    export_config : dict
        ``featcache_export`` metadata: backbone, layers, pooling, opset,
        input_size, exporter, featcache_version, torch_version.
    input_size : int
        Side S of the (B, 3, S, S) input the model was exported for.
    session : onnxruntime.InferenceSession
    """

    def __init__(self, path: str | os.PathLike[str], device: str = "cpu", intra_op_threads: int | None = None) -> None:
        self.path = Path(path)
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None  # set by from_model when it owns the file
        self._sha256: str | None = None  # the file's sha256, computed on first use
        if not self.path.is_file():
            raise OnnxModelNotFoundError(f"ONNX model {str(self.path)!r} does not exist. {_EXPORT_HINT[:-1]}, or "
                                         "use OnnxFeatureRunner.from_model.")
        kind, index = _parse_device(device)
        if intra_op_threads is not None and (not isinstance(intra_op_threads, int) or intra_op_threads < 1):
            raise ValueError(f"intra_op_threads {intra_op_threads!r} must be a positive int or None "
                             "(None: one per physical core).")
        self.intra_op_threads = intra_op_threads or physical_cores()
        meta, self._input_name, outputs = self._open(kind, index, device)
        if EXPORT_KEY not in meta or LAYERS_KEY not in meta:
            raise OnnxModelError(f"{self.path} lacks the {EXPORT_KEY!r}/{LAYERS_KEY!r} metadata (found keys "
                                 f"{sorted(meta)}): it was not exported by featcache. {_EXPORT_HINT}")
        self._export_config: dict[str, Any] = json.loads(meta[EXPORT_KEY])
        self._specs = [LayerSpec(**{**record, "map_shape": tuple(record["map_shape"])})
                       for record in json.loads(meta[LAYERS_KEY])]
        self.input_size = int(self._export_config["input_size"])
        if outputs != [spec.alias for spec in self._specs]:
            raise ValueError(f"{self.path}: graph outputs {outputs} do not match the layers in its metadata "
                             f"{[spec.alias for spec in self._specs]}. Hint: re-export the model.")
        logger.info("ONNX runner %s: %s on %s, %d intra-op threads", self.path.name, self.layer_names,
                    self.provider, self.intra_op_threads)

    def _open(self, kind: str, index: int, device: str) -> tuple[dict[str, str], str, list[str]]:
        """Open the graph with onnxruntime; set :attr:`session`, :attr:`provider` and :attr:`device`.

        A subclass runs the same file with another runtime by overriding this
        and :meth:`_infer`.

        Returns
        -------
        metadata : dict of str to str
            The file's custom metadata.
        input_name : str
        output_names : list of str
        """
        available = ort.get_available_providers()
        providers: list[Any] = [_CPU]
        if kind == "cuda":
            if _CUDA in available:
                providers = [(_CUDA, {"device_id": index}), _CPU]
            else:
                logger.warning("device %r requested but onnxruntime has no CUDAExecutionProvider (available: %s); "
                               "running on CPU. Hint: pip install onnxruntime-gpu (featcache[gpu]).",
                               device, available)
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session_options.intra_op_num_threads = self.intra_op_threads
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=session_options, providers=providers)
        except (_ORT_ERRORS.InvalidProtobuf, _ORT_ERRORS.InvalidArgument) as error:
            if "Load model from" not in str(error):  # not the file (a session option): a bug, kept as it is
                raise
            raise OnnxModelError(f"{self.path} is not an ONNX model (onnxruntime: {error}); it is damaged, cut "
                                 f"short or another kind of file. {_EXPORT_HINT}") from None
        self.provider: str = self.session.get_providers()[0]
        if kind == "cuda" and _CUDA in available and self.provider != _CUDA:
            logger.warning("CUDAExecutionProvider could not be initialised for %s; running on %s.",
                           self.path, self.provider)
        self.device = "cuda" if self.provider == _CUDA else "cpu"
        return (dict(self.session.get_modelmeta().custom_metadata_map), self.session.get_inputs()[0].name,
                [output.name for output in self.session.get_outputs()])

    def _infer(self, array: np.ndarray) -> list[np.ndarray]:
        """The graph's outputs, in order, for a (B, 3, S, S) float32 C-contiguous batch (B >= 1)."""
        return self.session.run(None, {self._input_name: array})

    @classmethod
    def from_source(cls, source: WeightsSource | LoadedBackbone, layers: Sequence[str], pooling: str = "avg",
                    device: str = "cpu", opset: int = DEFAULT_OPSET, *, input_size: int | None = None,
                    intra_op_threads: int | None = None, exporter: str = "auto",
                    cache_dir: str | os.PathLike[str] | None = "auto", **options: Any) -> "OnnxFeatureRunner":
        """Open the cached export of a backbone's weights; build and export the model only on a miss.

        Weights read from a file are cached under their :func:`~featcache.extract.onnx.cache.source_key`,
        so a hit imports no model library, builds no model and loads no
        weights. ``random`` weights (no file) or no cache: as :meth:`from_model`
        with ``source.load()``.

        Parameters
        ----------
        source : WeightsSource or LoadedBackbone
            The backbone and its weights (:func:`~featcache.extract.zoo.weights.resolve_weights`).
        layers, pooling, device, opset, input_size, intra_op_threads, exporter, cache_dir, options
            As for :meth:`from_model`.

        Returns
        -------
        OnnxFeatureRunner
            With :attr:`onnx_sha256` set.
        """
        key = (source_key(source.spec, source.weights_sha256, layers, pooling, input_size, opset, exporter)
               if source.weights_sha256 else None)
        found = read_only_lookup(resolve_cache_dir(cache_dir), key)  # a shared cache may be read-only
        folder = None if found is not None else writable_cache_dir(cache_dir)
        if found is None and (folder is None or key is None):
            return cls.from_model(source.load().model, source.spec, layers, pooling=pooling, device=device,
                                  opset=opset, input_size=input_size, intra_op_threads=intra_op_threads,
                                  exporter=exporter, cache_dir=None if folder is None else folder, **options)
        if found is None:
            found = lookup(folder, key)
        if found is None:
            from featcache.extract.runners.torch_runner import TorchFeatureExtractor

            extractor = TorchFeatureExtractor(source.load().model, source.spec, layers, pooling=pooling,
                                              device="cpu", channels_last=False)
            found = cached_export(extractor, folder, opset=opset, input_size=input_size, exporter=exporter, key=key)
        runner = cls(found[0], device=device, intra_op_threads=intra_op_threads, **options)
        runner._sha256 = found[1]
        return runner

    @classmethod
    def from_model(cls, model: nn.Module, spec: BackboneSpec, layers: Sequence[str], pooling: str = "avg",
                   device: str = "cpu", path: str | os.PathLike[str] | None = None, opset: int = DEFAULT_OPSET,
                   *, input_size: int | None = None, intra_op_threads: int | None = None,
                   exporter: str = "auto", cache_dir: str | os.PathLike[str] | None = "auto",
                   **options: Any) -> "OnnxFeatureRunner":
        """Export ``model``'s layers (or reuse a cached export) and open the result.

        Parameters
        ----------
        model : nn.Module
            The backbone (not modified).
        spec : BackboneSpec
            Its registry entry.
        layers : sequence of str
            Aliases or raw node names, as for :class:`TorchFeatureExtractor`.
        pooling : str
            One of :data:`featcache.store.schema.POOLINGS`.
        device : str
            See :class:`OnnxFeatureRunner`.
        path : path-like, optional
            Where to write the ``.onnx`` file (a copy of the cache entry when
            caching); default: the cache entry itself, or without a cache a
            temporary folder that lives as long as the runner.
        opset, input_size
            See :func:`export_onnx`.
        intra_op_threads : int, optional
            See :class:`OnnxFeatureRunner`.
        exporter : str
            See :func:`export_onnx`.
        cache_dir : path-like, "auto", "none" or None
            The export cache (see :mod:`featcache.extract.onnx.cache`):
            ``auto`` (default) its default folder, a folder, or ``none``/None
            to export every time.
        **options
            More arguments of the runner class (a subclass's own, e.g.
            :class:`~featcache.extract.onnx.openvino_runner.OpenVinoFeatureRunner`'s
            ``inference_precision``).

        Returns
        -------
        OnnxFeatureRunner
            With :attr:`onnx_sha256` set.
        """
        from featcache.extract.onnx.export import export_onnx
        from featcache.extract.runners.torch_runner import TorchFeatureExtractor

        extractor = TorchFeatureExtractor(model, spec, layers, pooling=pooling, device="cpu", channels_last=False)
        tmpdir, sha = None, None
        folder = writable_cache_dir(cache_dir)
        if folder is not None:
            cached, sha = cached_export(extractor, folder, opset=opset, input_size=input_size, exporter=exporter)
            if path is None:
                path = cached
            else:
                path = Path(path)
                with atomic_path(path) as partial:
                    shutil.copyfile(cached, partial)
        else:
            if path is None:
                tmpdir = tempfile.TemporaryDirectory(prefix="featcache-onnx-")
                path = Path(tmpdir.name) / f"{spec.name}.onnx"
            export_onnx(extractor, path, opset=opset, input_size=input_size, exporter=exporter)
        runner = cls(path, device=device, intra_op_threads=intra_op_threads, **options)
        runner._tmpdir = tmpdir  # removed when the runner is garbage-collected
        if sha is not None:
            runner._sha256 = sha
        return runner

    @property
    def onnx_sha256(self) -> str:
        """sha256 (hex) of the ``.onnx`` file (recorded as the store's ``onnx_sha256`` attribute)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def layer_names(self) -> list[str]:
        """Layer names, in output order."""
        return [spec.alias for spec in self._specs]

    @property
    def export_config(self) -> dict[str, Any]:
        """The ``featcache_export`` metadata (a copy)."""
        return json.loads(json.dumps(self._export_config))

    def layer_specs(self, input_size: int | None = None) -> list[LayerSpec]:
        """The :class:`LayerSpec` of every output, read from the model's metadata.

        Parameters
        ----------
        input_size : int, optional
            Must be None or the exported input size S.

        Raises
        ------
        ValueError
            If ``input_size`` differs from the exported one.
        """
        if input_size is not None and int(input_size) != self.input_size:
            raise ValueError(f"input_size {input_size} differs from the {self.input_size} that {self.path.name} "
                             f"was exported for (allowed: {self.input_size} or None). Hint: re-export with "
                             f"input_size={input_size}, or preprocess to {self.input_size}.")
        return list(self._specs)

    def __call__(self, batch: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
        """Pooled features of a batch.

        Parameters
        ----------
        batch : torch.Tensor or numpy.ndarray
            (B, 3, S, S) normalised images, S = :attr:`input_size`; any device
            and float dtype (converted to float32 on CPU).

        Returns
        -------
        dict of str to numpy.ndarray
            Layer name -> (B, D) float32 array, in :attr:`layer_names` order.
        """
        if not isinstance(batch, np.ndarray) and hasattr(batch, "detach"):  # a torch tensor, on any device
            array = batch.detach().float().cpu().contiguous().numpy()
        else:
            array = np.ascontiguousarray(batch, dtype=np.float32)
        expected = (3, self.input_size, self.input_size)
        if array.ndim != 4 or tuple(array.shape[1:]) != expected:
            raise ValueError(f"batch has shape {tuple(array.shape)}; expected (B, {', '.join(map(str, expected))}). "
                             f"Hint: use a Preprocessor with input_size={self.input_size}.")
        if array.shape[0] == 0:
            return {spec.alias: np.zeros((0, spec.dim), dtype=np.float32) for spec in self._specs}
        outputs = self._infer(array)
        return {name: np.asarray(value, dtype=np.float32) for name, value in zip(self.layer_names, outputs)}

    def __repr__(self) -> str:
        config = self._export_config
        return (f"OnnxFeatureRunner({str(self.path)!r}, backbone={config.get('backbone')!r}, "
                f"layers={self.layer_names}, provider={self.provider!r})")
