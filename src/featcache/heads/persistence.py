"""Save and load fitted heads without pickle.

A saved head is a directory (the same fitted head always saves to the same bytes)::

    head.json     format, class name, get_params(), fitted metadata, the sha256 of every
                  other file (written last; ``fit_seconds_`` is not saved)
    arrays.npz    scaler statistics and range, PCA components/mean/variances, classes, the
                  DataFrame column names fitted on, linear coefficients, a k-NN head's
                  normalised training rows (float32), labels or targets and class weights
                  (allow_pickle=False)
    model.txt     LightGBM native text model, truncated at the best iteration
    module.pt     MLP state_dict (loaded with torch.load(weights_only=True))

Only classes registered in :data:`featcache.heads.registry.HEAD_PATHS` can be loaded; the
class name in ``head.json`` is looked up there, never imported by path. Saving or
loading a head imports that head's module only (a logistic regression imports no
LightGBM or MLP code).

A folder that is absent or misses a file raises
:class:`~featcache.errors.SavedHeadNotFoundError`; a file that is truncated,
changed after saving (its sha256 differs from the one ``head.json`` records) or
unreadable raises :class:`~featcache.errors.SavedHeadError`. Both name the
folder, the file and the fix, never a raw ``KeyError`` or library error.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from sklearn.base import BaseEstimator, is_classifier
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from featcache.errors import SAVED_HEAD_HINT, SavedHeadError, SavedHeadNotFoundError
from featcache.util.hashing import file_sha256
from featcache.util.serial import jsonable

from .preprocessing import ClippedScaler
from .registry import HEAD_PATHS, head_class, head_storage

__all__ = ["FORMAT", "load_head", "save_head"]

log = logging.getLogger(__name__)

FORMAT = "featcache-head/1"
# fit_seconds_ is left out on purpose: the same fit then saves to the same bytes
_META_ATTRS = (
    "n_features_in_", "best_params_", "search_results_", "best_epoch_",
    "history_", "best_iteration_", "y_mean_", "y_scale_", "n_iter_",
)
_FILES = ("head.json", "arrays.npz", "model.txt", "module.pt")
#: What each file of a saved head holds (named when it is missing or unreadable).
_ROLES = {"head.json": "the head's class and parameters",
          "arrays.npz": "the scaler, PCA, coefficient and neighbour arrays",
          "model.txt": "the LightGBM model", "module.pt": "the MLP weights"}
#: The weights file of each storage kind, besides head.json and arrays.npz.
_WEIGHTS = {"lightgbm": "model.txt", "torch": "module.pt"}
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_ARRAY_ATTRS = ("classes_", "train_classes_")
_TUPLE_PARAMS = ("hidden_sizes", "ks")
#: A ``neighbours`` head's fitted arrays (kept as they are: the rows float32, as fitted, so predictions are identical).
_NEIGHBOUR_ARRAYS = ("train_rows_", "train_labels_", "train_targets_", "class_weight_")
# every fitted PCA attribute that transform / inverse_transform / score need
_PCA_ARRAYS = (
    "components", "mean", "explained_variance", "explained_variance_ratio",
    "singular_values", "noise_variance", "n_components", "n_samples",
)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but byte-reproducible (fixed zip timestamps, sorted members)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH), buf.getvalue())


def _class_names() -> dict[str, tuple[str, str]]:
    """Registered class name -> (head name, task), read from the registry's paths (nothing imported)."""
    return {path.partition(":")[2]: (head, task) for head, tasks in HEAD_PATHS.items() for task, path in tasks.items()}


def _registered(name: Any) -> tuple[type[BaseEstimator] | None, str]:
    """The registered class called ``name`` (importing its module only) and its storage kind
    (:func:`~featcache.heads.registry.head_storage`);
    ``(None, "")`` for a name that is not registered."""
    head, task = _class_names().get(name, (None, None))
    if head is None:
        return None, ""
    return head_class(head, task), head_storage(head)


def save_head(head: BaseEstimator, directory: str | Path) -> Path:
    """Write a fitted head to ``directory`` (created if needed).

    Parameters
    ----------
    head : estimator
        A fitted head of a registered class.
    directory : str or Path

    Returns
    -------
    Path
        ``directory``.
    """
    name = type(head).__name__
    cls, storage = _registered(name)
    if cls is not type(head):
        raise ValueError(f"cannot save {name}; allowed: {', '.join(sorted(_class_names()))}.")
    check_is_fitted(head)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in _FILES:  # a head of another kind may have been saved here before
        (directory / stale).unlink(missing_ok=True)
    arrays: dict[str, np.ndarray] = {a: getattr(head, a) for a in _ARRAY_ATTRS if hasattr(head, a)}
    if hasattr(head, "feature_names_in_"):  # an object array in scikit-learn: saved as str, without pickle
        arrays["feature_names_in_"] = np.asarray(head.feature_names_in_, dtype=str)
    scaler = getattr(head, "scaler_", None)
    if scaler is not None:
        arrays.update(
            scaler_mean=scaler.mean_, scaler_scale=scaler.scale_, scaler_var=scaler.var_,
            scaler_n_samples_seen=np.asarray(scaler.n_samples_seen_, dtype=np.int64),
        )
        if isinstance(scaler, ClippedScaler):
            arrays.update(scaler_min=scaler.data_min_, scaler_max=scaler.data_max_)
    pca = getattr(head, "pca_", None)
    if pca is not None:
        arrays.update({f"pca_{name}": np.asarray(getattr(pca, f"{name}_")) for name in _PCA_ARRAYS})
    if storage == "linear":
        arrays.update(coef=np.asarray(head.estimator_.coef_), intercept=np.asarray(head.estimator_.intercept_))
    if storage == "neighbours":
        arrays.update({a: getattr(head, a) for a in _NEIGHBOUR_ARRAYS if getattr(head, a, None) is not None})
    if storage == "lightgbm":
        head.booster_.save_model(str(directory / "model.txt"), num_iteration=head.best_iteration_)
    if storage == "torch":
        import torch

        state = {k: v.detach().cpu() for k, v in head.module_.state_dict().items()}
        torch.save(state, directory / "module.pt")
    _write_npz(directory / "arrays.npz", arrays)
    meta = {
        "format": FORMAT,
        "class": name,
        "params": jsonable(head.get_params(deep=False)),
        "fitted": jsonable({a: getattr(head, a) for a in _META_ATTRS if hasattr(head, a)}),
        "sha256": {f: file_sha256(directory / f) for f in _FILES[1:] if (directory / f).is_file()},
    }
    (directory / "head.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    log.info("saved %s to %s", name, directory)
    return directory


def _restore_scaler(arrays: dict[str, np.ndarray], n_features: int) -> StandardScaler:
    """The saved scaler: a :class:`ClippedScaler` with its range, or (a head saved before the range was kept)
    the plain StandardScaler it was trained with."""
    scaler = StandardScaler()
    if "scaler_min" in arrays:
        scaler = ClippedScaler()
        scaler.data_min_, scaler.data_max_ = arrays["scaler_min"], arrays["scaler_max"]
    scaler.mean_, scaler.scale_, scaler.var_ = arrays["scaler_mean"], arrays["scaler_scale"], arrays["scaler_var"]
    seen = arrays["scaler_n_samples_seen"]
    scaler.n_samples_seen_ = int(seen) if seen.ndim == 0 else seen
    scaler.n_features_in_ = n_features
    return scaler


def _restore_pca(arrays: dict[str, np.ndarray], head: BaseEstimator) -> PCA | None:
    if "pca_components" not in arrays:
        return None
    pca = PCA(n_components=head.pca_components, random_state=head.random_state)
    for name in _PCA_ARRAYS:
        value = arrays[f"pca_{name}"]
        setattr(pca, f"{name}_", value.item() if value.ndim == 0 else value)
    pca.n_components_ = int(pca.n_components_)
    pca.n_samples_ = int(pca.n_samples_)
    pca.n_features_in_ = int(pca.components_.shape[1])
    return pca


def _linear_model(head: BaseEstimator) -> Any:
    """The unfitted final linear model of a ``linear`` head, to receive the saved coef/intercept."""
    name = type(head).__name__
    if name == "LogisticRegressionHead":
        model = head.make_model(head.best_params_["C"], warm_start=False)
        model.classes_ = head.train_classes_
    elif name == "RidgeHead":
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=head.best_params_["alpha"])
    elif name in ("StreamingLogisticHead", "StreamingRidgeHead"):
        model = head.make_model(head.best_params_["alpha"], 0)
        if name == "StreamingLogisticHead":
            model.classes_ = head.classes_
    else:
        raise ValueError(f"no linear model to restore for {name}")
    return model


def _incomplete(directory: Path, name: str, problem: str) -> str:
    return (f"{directory} is not a usable saved head: {name} ({_ROLES.get(name, name)}) {problem}. "
            f"{SAVED_HEAD_HINT}")


@contextlib.contextmanager
def _reading(directory: Path, name: str, sha256: dict[str, str]) -> Iterator[Path]:
    """The path of the file ``name`` of a saved head, checked present and (when recorded) unchanged; an error
    while it is read inside the block becomes a :class:`SavedHeadError` naming it."""
    path = directory / name
    if not path.is_file():
        raise SavedHeadNotFoundError(_incomplete(directory, name, "is missing"))
    expected = sha256.get(name)
    if expected is not None and file_sha256(path) != expected:
        raise SavedHeadError(_incomplete(directory, name, "does not match the sha256 head.json records for it "
                                         "(truncated, or changed after the head was saved)"))
    try:
        yield path
    except SavedHeadError:
        raise
    except Exception as error:  # a truncated or foreign file fails in zipfile, numpy, LightGBM or torch
        raise SavedHeadError(_incomplete(directory, name, f"could not be read ({type(error).__name__}: {error}); "
                                         "it is truncated or was written by another version")) from error


def _read_meta(directory: Path) -> dict[str, Any]:
    """``head.json`` of a saved head, checked: its format, its class (registered) and its keys."""
    if directory.is_file():
        raise SavedHeadNotFoundError(f"{directory} is a file; allowed: a saved head's folder (it holds head.json "
                                     f"and arrays.npz). Hint: pass its folder, {directory.parent.as_posix()}, if "
                                     "it is one.")
    if not directory.is_dir():
        raise SavedHeadNotFoundError(f"{directory}: no such folder; a saved head is a folder holding head.json "
                                     f"and arrays.npz. {SAVED_HEAD_HINT}")
    with _reading(directory, "head.json", {}) as meta_path:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON object expected, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise SavedHeadError(f"{meta_path}: format {meta.get('format')!r}; allowed: {FORMAT!r} (written by another "
                             f"featcache version). {SAVED_HEAD_HINT}")
    if not isinstance(meta.get("class"), str) or _registered(meta["class"])[0] is None:
        raise SavedHeadError(f"{meta_path}: class {meta.get('class')!r}; allowed: "
                             f"{', '.join(sorted(_class_names()))}. {SAVED_HEAD_HINT}")
    missing = [key for key in ("params", "fitted") if not isinstance(meta.get(key), dict)]
    if missing:
        raise SavedHeadError(f"{meta_path}: no {' or '.join(map(repr, missing))} object (keys: {sorted(meta)}). "
                             f"{SAVED_HEAD_HINT}")
    return meta


def load_head(directory: str | Path) -> BaseEstimator:
    """Load a head written by :func:`save_head`.

    Parameters
    ----------
    directory : str or Path

    Returns
    -------
    estimator
        A fitted head whose predictions equal the saved one's. MLP modules are loaded
        onto the CPU.

    Raises
    ------
    SavedHeadNotFoundError
        (a FileNotFoundError) The folder, ``head.json``, ``arrays.npz`` or the weights file is missing.
    SavedHeadError
        (a ValueError) A file is truncated or unreadable, or of another format or class.
    """
    directory = Path(directory)
    meta = _read_meta(directory)
    cls, storage = _registered(meta["class"])
    sha256 = meta.get("sha256") or {}  # heads saved before the sha256 were recorded: not checked
    for name in ("arrays.npz", *([_WEIGHTS[storage]] if storage in _WEIGHTS else [])):
        with _reading(directory, name, sha256):
            pass  # every file present and unchanged before any is read
    with _reading(directory, "head.json", {}):
        params: dict[str, Any] = dict(meta["params"])
        for key in _TUPLE_PARAMS:
            if isinstance(params.get(key), list):
                params[key] = tuple(params[key])
        head = cls(**params)
        for attr, value in meta["fitted"].items():
            setattr(head, attr, value)
        n_features = int(head.n_features_in_)
    with _reading(directory, "arrays.npz", {}) as path:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        for attr in _ARRAY_ATTRS:
            if attr in arrays:
                setattr(head, attr, arrays[attr])
        if "feature_names_in_" in arrays:
            head.feature_names_in_ = arrays["feature_names_in_"].astype(object)
        head.scaler_ = _restore_scaler(arrays, n_features) if "scaler_mean" in arrays else None
        head.pca_ = _restore_pca(arrays, head)
        if storage == "linear":
            model = _linear_model(head)
            model.coef_, model.intercept_ = arrays["coef"], arrays["intercept"]
            if model.intercept_.ndim == 0:
                model.intercept_ = float(model.intercept_)
            model.n_features_in_ = int(model.coef_.shape[-1])  # PCA components when reduced
            head.estimator_ = model
        if storage == "neighbours":
            head.train_rows_ = arrays["train_rows_"]  # absent: a SavedHeadError naming arrays.npz
            head.__dict__.update({a: arrays[a] for a in _NEIGHBOUR_ARRAYS[1:3] if a in arrays})
            if is_classifier(head):
                head.class_weight_ = arrays.get("class_weight_")  # None: unweighted
    if storage == "lightgbm":
        import lightgbm

        with _reading(directory, "model.txt", {}) as path:
            head.booster_ = lightgbm.Booster(model_file=str(path))
    elif storage == "torch":
        import torch

        from .training import build_mlp

        n_out = int(head.classes_.size) if is_classifier(head) else 1
        n_in = n_features if head.pca_ is None else int(head.pca_.n_components_)
        module = build_mlp(n_in, head.hidden_sizes, n_out, head.dropout)
        with _reading(directory, "module.pt", {}) as path:
            module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        head.module_ = module.eval()
    log.info("loaded %s from %s", cls.__name__, directory)
    return head
