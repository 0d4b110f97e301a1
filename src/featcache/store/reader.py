"""Read-only access to a finished HDF5 feature store.

Example::

    with FeatureStore("features/digits/efficientnet_lite0.h5") as fs:
        fs.check_config(expected_config)          # StaleStoreError if params changed
        X = fs.read("pool", "train")              # (n, 1280) float32
        y = fs.labels("train")                    # (n,) int64
        X = fs.read("pool+block6", "train")       # (n, 1280 + 192): two layers side by side

A layer name may be fused (``pool+block6``: :func:`~featcache.store.schema.layer_parts`): :meth:`FeatureStore.read`,
:meth:`~FeatureStore.to_dask` and :meth:`~FeatureStore.layer_info` concatenate its layers column-wise, in order.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import h5py
import numpy as np

from featcache.errors import ParamError
from featcache.util.closing import Closing

from .errors import StaleStoreError, StoreError, StoreNotFoundError
from .lazy import DASK_CHUNK_TARGET_BYTES, dask_array
from .schema import FORMAT, LAYER_SEPARATOR, SPLIT_CODES, SPLITS, canonical_json, layer_parts

if TYPE_CHECKING:  # dask is imported only where a dask array is built
    import dask.array

__all__ = ["FeatureStore", "diff_config"]

logger = logging.getLogger(__name__)

_REQUIRED = ("ids", "label", "target", "split", "classes", "errors", "features")
_MISSING = object()


def _plain(value: Any) -> Any:
    """h5py attribute value -> plain Python (str, bool, int, float) or ndarray."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OS":
            return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in value.tolist()]
        return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _abbreviate(value: Any) -> Any:
    """A sha256 (64 hex digits) cut to its first 12 and ``...`` for a message; anything else unchanged."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    return value


def _strs(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values.tolist()]


def _float_dtype(dtype: Any) -> np.dtype:
    """``dtype`` as a numpy float dtype; :class:`~featcache.errors.ParamError` for anything else."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.kind != "f":
        raise ParamError(
            f"dtype={dtype!r} is invalid; allowed: a float dtype (np.float16, np.float32, np.float64): the "
            "stored features are floats and another type would truncate them. Hint: cast the result yourself."
        )
    return dt


def diff_config(stored: Any, expected: Any, prefix: str = "") -> list[str]:
    """List the key paths whose values differ between two JSON-like configs.

    Parameters
    ----------
    stored, expected : JSON-like
        Nested dicts / lists / scalars.
    prefix : str
        Key path of ``stored`` (dotted), for recursion.

    Returns
    -------
    list of str
        e.g. ``["extract.pooling: store has 'avg', params say 'max'"]``.
    """
    if isinstance(stored, dict) and isinstance(expected, dict):
        out: list[str] = []
        for key in sorted(set(stored) | set(expected)):
            path = f"{prefix}.{key}" if prefix else str(key)
            out += diff_config(stored.get(key, _MISSING), expected.get(key, _MISSING), path)
        return out
    if stored == expected and type(stored) is type(expected):
        return []
    show = lambda v: "nothing" if v is _MISSING else repr(v)  # noqa: E731
    return [f"{prefix or '<config>'}: store has {show(stored)}, params say {show(expected)}"]


class FeatureStore(Closing):
    """A complete feature store opened read-only.

    Parameters
    ----------
    path : path-like
        The ``.h5`` file written by :class:`~featcache.store.writer.StoreWriter`.

    Raises
    ------
    StoreNotFoundError
        If the file does not exist (a :class:`StoreError` and a ``FileNotFoundError``).
    StoreError
        If it is not a featcache store of format :data:`FORMAT` or is incomplete.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            stores = sorted(p.name for p in self.path.glob("*.h5"))[:5]
            raise StoreError(
                f"{self.path} is a folder; allowed: a feature store file (.h5) written by the extraction"
                + (f", such as {', '.join(stores)} in it" if stores else "")
                + ". Hint: pass the file, e.g. features/<dataset>/<backbone>.h5"
            )
        if not self.path.is_file():
            raise StoreNotFoundError(
                f"feature store {self.path} does not exist; hint: run the extraction first "
                "(`dvc repro` or `featcache extract`)"
            )
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as exc:
            if not h5py.is_hdf5(self.path):  # another kind of file (a manifest.csv?): never say to delete it
                raise StoreError(
                    f"{self.path} is not an HDF5 file (no HDF5 signature); allowed: a feature store (.h5) "
                    "written by the extraction. Hint: pass the file `featcache extract --out` wrote, e.g. "
                    "features/<dataset>/<backbone>.h5 (if it is one, it is damaged: delete it and extract again)"
                ) from exc
            raise StoreError(
                f"{self.path} is not a readable HDF5 file ({exc}); hint: delete it and "
                "rerun extraction"
            ) from exc
        try:
            self._load()
        except BaseException:
            self._file.close()
            raise

    def _load(self) -> None:
        f = self._file
        self.attrs: dict[str, Any] = {k: _plain(f.attrs[k]) for k in sorted(f.attrs)}
        fmt = self.attrs.get("format")
        if fmt != FORMAT:
            raise StoreError(
                f"{self.path} has format {fmt!r}, this featcache reads {FORMAT!r}; "
                "hint: rerun extraction to rewrite it"
            )
        if self.attrs.get("complete") is not True:
            raise StoreError(
                f"incomplete store {self.path} (complete={self.attrs.get('complete')!r}); "
                "hint: rerun extraction"
            )
        missing = [name for name in _REQUIRED if name not in f]
        if missing:
            raise StoreError(f"{self.path} lacks {missing}; hint: rerun extraction")
        self.config: dict[str, Any] = json.loads(self.attrs.get("config", "{}"))
        self.config_sha256: str = str(self.attrs.get("config_sha256", ""))
        self.backbone: str = str(self.attrs.get("backbone", self.config.get("backbone", "")))
        group = f["features"]
        order = _plain(group.attrs["layers"]) if "layers" in group.attrs else sorted(group)
        self.layers: list[str] = [name for name in order if name in group]
        self.classes: list[str] = _strs(f["classes"][()])
        self._ids = np.array(_strs(f["ids"][()]), dtype=np.str_)
        self._labels = np.asarray(f["label"][()], dtype=np.int64)
        self._targets = np.asarray(f["target"][()], dtype=np.float64)
        self._splits = np.asarray(f["split"][()], dtype=np.uint8)
        self.n_rows: int = int(self._ids.shape[0])
        self.task: str = "classification" if (self._labels >= 0).any() else "regression"

    # ---------------------------------------------------------------- metadata
    def layer_info(self, layer: str) -> dict[str, Any]:
        """Attributes of ``/features/<layer>``.

        Parameters
        ----------
        layer : str
            One of :attr:`layers`, or a fused name of several (``pool+block6``).

        Returns
        -------
        dict
            node (str), pooling (str), map_shape (tuple of int), post_relu
            (bool), dim (int), dtype (str, the storage dtype); for a token map also
            prefix_tokens (int: its leading non-patch tokens, left out of ``avg``/``max``).
            A fused name: node, pooling and dtype of its parts joined by ``+`` (one dtype when they agree), dim
            their sum, and ``parts``: the dict above of each part, in order (no map_shape or post_relu of its own).
        """
        infos = [self._info(name, ds) for name, ds in self._datasets(layer)]
        if len(infos) == 1:
            return infos[0]
        dtypes = list(dict.fromkeys(info["dtype"] for info in infos))
        return {"node": LAYER_SEPARATOR.join(info["node"] for info in infos),
                "pooling": LAYER_SEPARATOR.join(info["pooling"] for info in infos),
                "dim": sum(info["dim"] for info in infos), "dtype": LAYER_SEPARATOR.join(dtypes),
                "parts": infos}

    @staticmethod
    def _info(layer: str, ds: h5py.Dataset) -> dict[str, Any]:
        a = ds.attrs
        info = {
            "node": _plain(a["node"]),
            "pooling": _plain(a["pooling"]),
            "map_shape": tuple(int(v) for v in np.atleast_1d(a["map_shape"])),
            "post_relu": bool(a["post_relu"]),
            "dim": int(a["dim"]),
            "dtype": ds.dtype.name,
        }
        if "prefix_tokens" in a:  # token maps only
            info["prefix_tokens"] = int(a["prefix_tokens"])
        return info

    def split_mask(self, split: str | None) -> np.ndarray:
        """Boolean row mask (N,) of one split; None selects every row."""
        if split is None:
            return np.ones(self.n_rows, dtype=bool)
        if not isinstance(split, str) or split not in SPLIT_CODES:
            raise StoreError(f"unknown split {split!r}; allowed: {list(SPLITS)} or None (all)")
        return self._splits == SPLIT_CODES[split]

    def ids(self, split: str | None = None) -> np.ndarray:
        """Ids (n,) of the rows of ``split``, as str."""
        return self._ids[self.split_mask(split)]

    def labels(self, split: str | None = None) -> np.ndarray:
        """Class indices (n,) int64 of ``split``; -1 where unlabeled."""
        return self._labels[self.split_mask(split)]

    def targets(self, split: str | None = None) -> np.ndarray:
        """Regression targets (n,) float64 of ``split``; NaN where absent."""
        return self._targets[self.split_mask(split)]

    def errors(self) -> list[tuple[str, str]]:
        """The (id, reason) of every skipped input, in input order."""
        table = self._open_file()["errors"][()]
        return list(zip(_strs(table["id"]), _strs(table["reason"])))

    # ---------------------------------------------------------------- features
    def _open_file(self) -> h5py.File:
        """The HDF5 file; a :class:`StoreError` once :meth:`close` (or the ``with`` block) closed it."""
        if not self._file.id.valid:
            raise StoreError(
                f"feature store {self.path} is closed; its features and errors table can no longer be read "
                "(ids, labels, targets and dask arrays made before still can). Hint: read inside the "
                "`with FeatureStore(path) as store:` block, or open it again"
            )
        return self._file

    def _datasets(self, layer: str) -> list[tuple[str, h5py.Dataset]]:
        """(name, dataset) of each part of ``layer`` (one for a plain name), in order."""
        file = self._open_file()
        try:
            parts = layer_parts(layer)
        except ParamError as exc:
            raise StoreError(f"{exc} (layers of {self.path}: {self.layers})") from None
        unknown = [part for part in parts if part not in self.layers]
        if unknown:
            which = f"unknown layer {layer!r}" if len(parts) == 1 else \
                f"layer {layer!r} fuses {unknown}, which {'is' if len(unknown) == 1 else 'are'} not stored"
            raise StoreError(
                f"{which} in {self.path}; available: {self.layers}"
                + (f" (or several of them joined by {LAYER_SEPARATOR!r})" if len(parts) > 1 else "")
                + ". Hint: extract it by adding it to the extract layers and rerunning"
            )
        return [(part, file["features"][part]) for part in parts]

    def read(self, layer: str, split: str | None = None, dtype: Any = np.float32) -> np.ndarray:
        """Load the features of one layer (or of a fused name's layers, side by side) into memory.

        Parameters
        ----------
        layer : str
            Alias, one of :attr:`layers`; or several joined by ``+`` (``pool+block6``), whose columns are
            concatenated in that order.
        split : {"train", "val", "test"} or None
            Rows to return; None for all.
        dtype : numpy float dtype
            Output dtype (the stored float16 is cast); other kinds raise ``ParamError``.

        Returns
        -------
        ndarray, (n, D)
            D: the sum of the parts' dims for a fused name.
        """
        dtype = _float_dtype(dtype)
        datasets = self._datasets(layer)
        mask = self.split_mask(split)
        out = np.empty((int(mask.sum()), sum(ds.shape[1] for _, ds in datasets)), dtype=dtype)
        column = 0
        for name, ds in datasets:
            self._read_into(out[:, column : column + ds.shape[1]], name, ds, mask)
            column += ds.shape[1]
        return out

    def _read_into(self, out: np.ndarray, layer: str, ds: h5py.Dataset, mask: np.ndarray) -> None:
        """Copy the ``mask`` rows (N,) of ``ds`` (N, D) into ``out`` (n, D), a block of rows at a time."""
        step = ds.chunks[0] if ds.chunks else max(1, ds.shape[0])
        step *= max(1, (16 * 1024 * 1024) // max(1, step * ds.shape[1] * ds.dtype.itemsize))
        pos = 0
        for start in range(0, ds.shape[0], step):
            sel = mask[start : start + step]
            if not sel.any():
                continue
            try:
                block = ds[start : start + sel.size]
            except OSError as exc:  # h5py's read of a damaged chunk (a disk fault, a copy cut short)
                raise StoreError(
                    f"{self.path}: rows {start}..{start + sel.size - 1} of layer {layer!r} cannot be read "
                    f"({exc}); the file is damaged. Hint: delete it and extract again (`dvc repro`, or "
                    "`featcache extract ... --force`: a plain rerun keeps a store whose inputs did not change)"
                ) from exc
            rows = block if sel.all() else block[sel]
            out[pos : pos + rows.shape[0]] = rows
            pos += rows.shape[0]

    def to_dask(
        self,
        layer: str,
        split: str | None = None,
        dtype: Any = np.float32,
        rows_per_chunk: int | None = None,
    ) -> dask.array.Array:
        """Lazy dask array (n, D) of one layer, chunked along whole HDF5 chunks.

        Each task opens the file by path, so the graph pickles and runs on
        dask.distributed workers. A fused name (``pool+block6``) gives its layers' arrays concatenated along
        the columns (``da.concatenate(axis=1)``), all chunked by the same rows.

        Parameters
        ----------
        layer, split, dtype
            As in :meth:`read`.
        rows_per_chunk : int, optional
            Rows per dask chunk; default a multiple of the stored chunk rows (for a fused name: of the largest
            stored chunk rows of its layers, sized by the summed D).

        Returns
        -------
        dask.array.Array, (n, D)
        """
        dtype = _float_dtype(dtype)
        datasets = self._datasets(layer)
        chunk_rows = [ds.chunks[0] if ds.chunks else max(1, ds.shape[0]) for _, ds in datasets]
        if len(datasets) == 1:
            _, ds = datasets[0]
            arr = dask_array(self.path, ds.name.lstrip("/"), ds.shape, chunk_rows[0], dtype, rows_per_chunk)
        else:
            import dask.array as da

            if rows_per_chunk is None:  # as dask_array's default, for the fused row width
                stored = max(chunk_rows)
                per_row = max(1, sum(ds.shape[1] for _, ds in datasets) * np.dtype(dtype).itemsize)
                rows_per_chunk = stored * max(1, DASK_CHUNK_TARGET_BYTES // (stored * per_row))
            arr = da.concatenate([dask_array(self.path, ds.name.lstrip("/"), ds.shape, rows, dtype, rows_per_chunk)
                                  for (_, ds), rows in zip(datasets, chunk_rows)], axis=1)
        if split is None:
            return arr
        return arr[self.split_mask(split)]

    # ---------------------------------------------------------------- config
    def check_config(self, expected: Mapping[str, Any]) -> None:
        """Raise if the store was extracted with a config other than ``expected``.

        Parameters
        ----------
        expected : mapping
            The extraction config the current params produce (same shape as
            the stored ``config`` attribute).

        Raises
        ------
        StaleStoreError
            Naming every differing key path and both values.
        """
        wanted = json.loads(canonical_json(expected))
        diffs = diff_config(self.config, wanted)
        if diffs:
            raise StaleStoreError(
                f"feature store {self.path} is stale: " + "; ".join(diffs) + ". Hint: rerun "
                "`dvc repro` (or the extract stage) to re-extract with the current params"
            )

    def diff_inputs(self, expected: Mapping[str, Any], ignore_config: Sequence[str] = ()) -> list[str]:
        """What differs between the root attributes the store records and ``expected``: [] when it was made
        from exactly these inputs (what an extraction checks before it rebuilds a finished store).

        Parameters
        ----------
        expected : mapping
            Root attributes as a run would write them (e.g. ``manifest_sha256``, ``weights_sha256``); ``config``
            (a mapping or its canonical JSON) is compared key by key (:func:`diff_config`), the others as values.
        ignore_config : sequence of str
            Dotted key paths of the stored config left out (e.g. ``extract.int8_graph``, which a run records only
            once it has built its graph).

        Returns
        -------
        list of str
            e.g. ``["config extract.dtype: store has 'float16', params say 'float32'",
            "manifest_sha256: store has '1a2b3c4d5e6f...', this run has '0f9e8d7c6b5a...'"]``.
        """
        diffs: list[str] = []
        for key, value in expected.items():
            if key == "config":
                wanted = json.loads(value if isinstance(value, str) else canonical_json(value))
                stored = json.loads(canonical_json(self.config))
                for dotted in ignore_config:
                    *parents, leaf = dotted.split(".")
                    node = stored
                    for part in parents:
                        node = node.get(part, {}) if isinstance(node, dict) else {}
                    if isinstance(node, dict):
                        node.pop(leaf, None)
                diffs += [f"config {diff}" for diff in diff_config(stored, wanted)]
                continue
            stored_value = self.attrs.get(key, _MISSING)
            same = np.array_equal(stored_value, value) if isinstance(stored_value, np.ndarray) \
                else stored_value is not _MISSING and stored_value == value
            if not same:
                show = lambda v: "nothing" if v is _MISSING else repr(_abbreviate(v))  # noqa: E731
                diffs.append(f"{key}: store has {show(stored_value)}, this run has {show(value)}")
        return diffs

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Close the HDF5 file; dask arrays made earlier keep working."""
        if self._file.id.valid:
            self._file.close()

    def __repr__(self) -> str:
        return (
            f"FeatureStore({str(self.path)!r}, backbone={self.backbone!r}, "
            f"n_rows={self.n_rows}, layers={self.layers})"
        )
