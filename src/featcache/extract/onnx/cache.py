"""A cache of ONNX exports, keyed by everything that changes the exported graph.

Exporting a backbone takes seconds (more for VGG16) and gives the same graph
for the same inputs, so :func:`cached_export` keeps each export in a cache
folder under a key. Two kinds of key name an entry:

* :func:`source_key`, for weights read from a file (``pretrained`` or a
  local ``.pth``): the backbone, the sha256 of the weights *file*, the
  requested layers and their registry nodes, the pooling and input size, the
  opset and exporter, the torch, onnx and model-library (timm or
  torchvision) versions, featcache's version and
  :data:`~featcache.extract.onnx.format.EXPORT_CODE_VERSION`. It is computed
  without building the model, so a cache hit (:func:`lookup`) costs a file
  hash: no model library import, no model, no weights loaded
  (:meth:`~featcache.extract.onnx.runner.OnnxFeatureRunner.from_source`).
* :func:`cache_key`, for a model in hand (``random`` weights, or a module
  built by the caller): the sha256 of the weights in the truncated module and
  the layers' (alias, node, dimension), with the same remaining fields.

Layout: ``<cache>/<backbone>-<key>.onnx`` and a sidecar ``<...>.onnx.json``
(the key's fields and the file's sha256). Entries are written to temporary
files and published with ``os.replace`` under an exclusive file lock
(``<...>.onnx.lock``), graph first, sidecar last, so concurrent processes
never read a half-written file and export a missing key once. A reader
checks an entry without the lock; one that does not verify may be halfway
through publication (new graph, old or no sidecar), so it is checked again
under the lock, after the writer is done. Only an entry that still fails
there, its file missing or its sha256 different from its sidecar (corrupt,
truncated), is logged and rebuilt.

Where the cache lives (:func:`resolve_cache_dir`): the ``extract_run.onnx_cache``
param (a folder, ``auto`` or ``none``), else ``$FEATCACHE_CACHE_DIR/onnx``,
else ``$XDG_CACHE_HOME/featcache/onnx`` (``~/.cache/featcache/onnx``). A folder
that cannot be created or written (read-only home, a file in the way) is no
cache: :func:`writable_cache_dir` warns once and the runners export to a
temporary file, as with ``none``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import featcache
from featcache.extract.onnx.format import DEFAULT_OPSET, EXPORT_CODE_VERSION, resolve_exporter
from featcache.extract.zoo.registry import BackboneSpec
from featcache.store.lock import FileLock
from featcache.store.schema import canonical_json
from featcache.util.cache_dir import CACHE_ENV, ONNX_FOLDER, CacheEntry, cache_root, mark_used, remove_entry
from featcache.util.hashing import file_sha256

if TYPE_CHECKING:
    import torch

    from featcache.extract.runners.torch_runner import TorchFeatureExtractor

__all__ = ["CACHE_ENV", "cache_key", "cached_build", "cached_export", "default_cache_dir", "entry_path",
           "export_entries", "find_entry", "lookup", "read_only_lookup", "read_sidecar", "remove_export_entry",
           "resolve_cache_dir", "source_key", "state_sha256", "writable_cache_dir"]

logger = logging.getLogger(__name__)

#: Seconds to wait for another process exporting the same key.
LOCK_TIMEOUT = 1800.0


def default_cache_dir() -> Path:
    """``$FEATCACHE_CACHE_DIR/onnx``, else ``$XDG_CACHE_HOME/featcache/onnx`` (default ``~/.cache``)."""
    return cache_root() / ONNX_FOLDER


def resolve_cache_dir(setting: str | os.PathLike[str] | None) -> Path | None:
    """The cache folder of an ``extract_run.onnx_cache`` setting.

    Parameters
    ----------
    setting : str, path-like or None
        ``"auto"``: :func:`default_cache_dir`; ``"none"`` or None: no cache
        (returns None); anything else: that folder.
    """
    if setting is None or str(setting) == "none":
        return None
    if str(setting) == "auto":
        return default_cache_dir()
    return Path(setting).expanduser()


_UNWRITABLE_WARNED: set[Path] = set()


def writable_cache_dir(setting: str | os.PathLike[str] | None) -> Path | None:
    """:func:`resolve_cache_dir`, or None (no cache, with a warning) when that folder cannot be written.

    The folder is created if needed and a probe file written and removed: a
    cache that cannot hold an export must not stop an extraction or a
    ``featcache predict`` that would run without it (the export then goes to a
    temporary file, as with ``onnx_cache: none``).

    Parameters
    ----------
    setting : str, path-like or None
        As for :func:`resolve_cache_dir`.
    """
    folder = resolve_cache_dir(setting)
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".featcache-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        if folder not in _UNWRITABLE_WARNED:
            _UNWRITABLE_WARNED.add(folder)
            logger.warning("The ONNX export cache %s is not writable (%s: %s); exporting to a temporary file "
                           "instead (every run exports again). Hint: set extract_run.onnx_cache to a writable folder "
                           "(or %s, or none to silence this).", folder, type(error).__name__, error, CACHE_ENV)
        return None
    return folder


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict: every name, dtype, shape and byte, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def _versions(spec: BackboneSpec) -> dict[str, str]:
    """Versions of what builds and exports the graph (read from package metadata: nothing is imported)."""
    version = importlib.metadata.version
    return {
        "torch_version": version("torch").split("+")[0],
        "onnx_version": version("onnx"),
        "model_library": f"{spec.family} {version(spec.family)}",
        "featcache_version": featcache.__version__,
        "export_code_version": str(EXPORT_CODE_VERSION),
    }


def source_key(spec: BackboneSpec, weights_sha256: str, layers: Sequence[str], pooling: str,
               input_size: int | None, opset: int, exporter: str) -> dict[str, Any]:
    """The key of an export of weights read from a file, computed without building the model.

    Parameters
    ----------
    spec : BackboneSpec
        The registry entry.
    weights_sha256 : str
        sha256 of the weights file (:class:`~featcache.extract.zoo.weights.WeightsSource`); not empty.
    layers : sequence of str
        Aliases or raw node names, in output order (``default`` allowed).
    pooling : str
    input_size : int or None
        None: the registry's.
    opset : int
    exporter : {"auto", "dynamo", "torchscript"}

    Returns
    -------
    dict
        JSON-serialisable fields; their canonical JSON's sha256 names the entry.
    """
    if not weights_sha256:
        raise ValueError(f"source_key needs the sha256 of a weights file for {spec.name!r}, got "
                         f"{weights_sha256!r}. Hint: use cache_key with the built model for random weights.")
    requested = [spec.default_layer if layer == "default" else str(layer) for layer in layers]
    return {
        "backbone": spec.name,
        "weights_file_sha256": weights_sha256,
        "layers": [{"layer": layer, "node": spec.layers[layer].node if layer in spec.layers else layer}
                   for layer in requested],
        "pooling": pooling,
        "input_size": int(input_size or spec.input_size),
        "opset": int(opset),
        "exporter": resolve_exporter(exporter, opset),
        **_versions(spec),
    }


def cache_key(extractor: TorchFeatureExtractor, opset: int, input_size: int | None, exporter: str) -> dict[str, Any]:
    """The key of an export of a model in hand: every input that changes the graph it writes.

    Returns
    -------
    dict
        JSON-serialisable fields; their canonical JSON's sha256 names the entry.
    """
    size = int(input_size or extractor.spec.input_size)
    return {
        "backbone": extractor.spec.name,
        "weights_sha256": state_sha256(extractor.module),
        "layers": [dataclasses.asdict(spec) for spec in extractor.layer_specs(size)],
        "pooling": extractor.pooling,
        "input_size": size,
        "opset": int(opset),
        "exporter": resolve_exporter(exporter, opset),
        **_versions(extractor.spec),
    }


def entry_path(cache_dir: str | os.PathLike[str], key: dict[str, Any]) -> Path:
    """The ``.onnx`` file of a :func:`cache_key` in ``cache_dir``: ``<backbone>-<sha256 of the key>.onnx``."""
    digest = hashlib.sha256(canonical_json(key).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{key['backbone']}-{digest}.onnx"


def _inspect(path: Path) -> tuple[str | None, str]:
    """``(sha256, "")`` of a verified entry, ``(None, "")`` of an absent one, ``(None, why)`` of a bad one."""
    sidecar = path.with_name(path.name + ".json")
    if not path.is_file() and not sidecar.is_file():
        return None, ""
    try:
        expected = json.loads(sidecar.read_text(encoding="utf-8"))["sha256"]
        actual = file_sha256(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"is unreadable ({type(error).__name__}: {error})"
    if actual != expected:
        return None, f"is corrupt or truncated (sha256 {actual[:12]}..., sidecar says {str(expected)[:12]}...)"
    return actual, ""


def _entry_lock(path: Path) -> FileLock:
    """The exclusive lock of the entry ``path``, held while it is exported and published."""
    return FileLock(path.with_name(path.name + ".lock"), timeout=LOCK_TIMEOUT)


def lookup(cache_dir: str | os.PathLike[str], key: dict[str, Any]) -> tuple[Path, str] | None:
    """The verified entry of ``key`` (path, sha256), or None when it is missing or bad.

    Lock-free when the entry verifies. An entry that is present but does not
    verify may be halfway through publication by another process: it is
    checked again under its lock (waiting for that writer); if it still fails
    it is bad, and :func:`cached_export` logs and rebuilds it.
    """
    path = entry_path(cache_dir, key)
    sha, problem = _inspect(path)
    if problem:
        with _entry_lock(path):
            sha, problem = _inspect(path)
    if sha is None:
        return None
    logger.info("ONNX export cache hit: %s", path)
    mark_used(path.with_name(path.name + ".json"))
    return path, sha


def read_only_lookup(folder: Path | None, key: dict[str, Any] | None) -> tuple[Path, str] | None:
    """:func:`lookup`, needing no write access: the verified entry of ``key`` in ``folder``, or None.

    A cache prepared once and shared read-only (a team's folder, a container image) still serves its
    entries (float32 exports and int8 graphs alike); a miss, a damaged entry or an unreadable folder is left to
    the writable path (:func:`writable_cache_dir`, :func:`cached_build`).
    """
    if folder is None or key is None or not folder.is_dir():
        return None
    try:
        return lookup(folder, key)
    except OSError:  # a damaged entry's lock cannot be taken in a read-only folder
        return None


def find_entry(cache_dir: str | os.PathLike[str] | None, sha256: str, pattern: str = "*.onnx") -> Path | None:
    """The entry of ``cache_dir`` whose file has the sha256 ``sha256``, whatever its key; None when none has.

    For a graph known by its bytes (a store's recorded ``onnx_sha256``) rather than its key: the sidecars
    (``<entry>.json``) of the entries matching ``pattern`` say which one it should be, and that file's own
    sha256 must then equal ``sha256`` (a modified or truncated file is never returned). Needs no write
    access (no lock is taken): a read-only shared cache serves it.

    Parameters
    ----------
    cache_dir : path-like or None
        The cache folder (None, or a missing folder: None).
    sha256 : str
        sha256 (hex) of the wanted ``.onnx`` file.
    pattern : str
        Glob of the entries to consider (``"*-int8-*.onnx"``: the int8 graphs).
    """
    if cache_dir is None or not Path(cache_dir).is_dir():
        return None
    for path in sorted(Path(cache_dir).glob(pattern)):
        try:
            if read_sidecar(path).get("sha256") != sha256:
                continue
            actual = file_sha256(path)
        except (OSError, ValueError, AttributeError):
            continue
        if actual == sha256:
            mark_used(path.with_name(path.name + ".json"))
            return path
        logger.warning("ONNX cache entry %s is not the graph its sidecar names (sha256 %s..., expected %s...); "
                       "not using it.", path, actual[:12], sha256[:12])
    return None


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar record of a cache entry: ``sha256``, ``key`` and whatever its builder added."""
    path = Path(path)
    return json.loads(path.with_name(path.name + ".json").read_text(encoding="utf-8"))


def cached_build(cache_dir: str | os.PathLike[str], key: dict[str, Any],
                 build: Callable[[Path], dict[str, Any] | None]) -> tuple[Path, str]:
    """Reuse the verified entry of ``key`` in ``cache_dir``, else build and publish it.

    Parameters
    ----------
    cache_dir : path-like
        The cache folder (created if missing).
    key : dict
        The entry's key (with a ``backbone`` field, which starts the file name).
    build : callable
        ``build(path)`` writes the ``.onnx`` file at ``path`` and returns
        extra JSON-serialisable fields for the sidecar (or None); called under
        the entry's lock, only on a miss.

    Returns
    -------
    path : Path
        The cached ``.onnx`` file (read it, do not modify it).
    sha256 : str
        Its sha256 (hex), verified against the sidecar.
    """
    path = entry_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_name(path.name + ".json")
    if (hit := lookup(cache_dir, key)) is not None:
        return hit
    with _entry_lock(path):
        sha, problem = _inspect(path)
        if sha is not None:  # another process published it meanwhile
            return path, sha
        if problem:
            logger.warning("ONNX cache entry %s %s; rebuilding it.", path, problem)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            extra = build(partial) or {}
            sha = file_sha256(partial)
            partial_sidecar = partial.with_name(partial.name + ".json")
            record = {**extra, "sha256": sha, "key": key}
            partial_sidecar.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(partial, path)  # the sidecar last: a lock-free reader sees both or a mismatch (then waits)
            os.replace(partial_sidecar, sidecar)
        finally:
            partial.unlink(missing_ok=True)
            partial.with_name(partial.name + ".json").unlink(missing_ok=True)
    logger.info("ONNX cache entry published: %s", path)
    return path, sha


def cached_export(extractor: TorchFeatureExtractor, cache_dir: str | os.PathLike[str],
                  opset: int = DEFAULT_OPSET, input_size: int | None = None, *,
                  exporter: str = "auto", key: dict[str, Any] | None = None) -> tuple[Path, str]:
    """Export ``extractor`` to ONNX through the cache: reuse a verified entry, else export and publish one.

    Parameters
    ----------
    extractor : TorchFeatureExtractor
        As for :func:`~featcache.extract.onnx.export.export_onnx`.
    cache_dir : path-like
        The cache folder (created if missing).
    opset, input_size, exporter
        As for :func:`~featcache.extract.onnx.export.export_onnx`.
    key : dict, optional
        The entry's key: the caller's :func:`source_key` of the same export;
        default :func:`cache_key` of ``extractor``.

    Returns
    -------
    path, sha256
        As for :func:`cached_build`.
    """
    from featcache.extract.onnx.export import export_onnx

    key = cache_key(extractor, opset, input_size, exporter) if key is None else key

    def build(partial: Path) -> None:
        export_onnx(extractor, partial, opset=opset, input_size=input_size, exporter=exporter)

    return cached_build(cache_dir, key, build)


def _final_path(path: Path) -> Path:
    """The ``.onnx`` entry a file of the cache folder belongs to (its sidecar, lock or a writer's partial file)."""
    name = path.name
    if name.startswith(".") and ".onnx." in name:  # .<entry>.onnx.<pid>.<hex>.tmp[.json]: a writer's partial
        name = name[1:name.index(".onnx.") + len(".onnx")]
    for suffix in (".json", ".lock"):
        name = name.removesuffix(suffix)
    return path.with_name(name)


def export_entries(cache_dir: str | os.PathLike[str]) -> list[CacheEntry]:
    """The entries of an ONNX cache folder (float32 exports and int8 graphs), oldest use first.

    An entry is a graph with its sidecar (``<name>.onnx``, ``<name>.onnx.json``), and its lock file if one was
    left; a sidecar without its graph, or the partial files of a writer that was killed, make entries of their own
    (:func:`remove_export_entry` takes them under the lock of the graph they were written for). Its last use is the
    latest modification time of its files: a cache hit marks the sidecar
    (:func:`~featcache.util.cache_dir.mark_used`).
    """
    folder = Path(cache_dir)
    if not folder.is_dir():
        return []
    groups: dict[Path, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and ".onnx" in path.name:
            partial = path.name.startswith(".")  # a writer's graph and sidecar: one entry
            group = path.with_name(path.name.removesuffix(".json")) if partial else _final_path(path)
            groups.setdefault(group, []).append(path)
    entries = []
    for key, files in groups.items():
        files.sort(key=lambda path: (path != key, path.name))  # the graph (or the partial) first: it names the entry
        entry = CacheEntry.of(files)
        if entry is not None:
            entries.append(entry)
    return sorted(entries, key=lambda entry: entry.last_used)


def remove_export_entry(entry: CacheEntry) -> bool:
    """Delete the files of an :func:`export_entries` entry under the lock of its graph; False (nothing deleted)
    when another process holds that lock (it is exporting or publishing that graph now), or a file could not be
    deleted."""
    from featcache.store.errors import StoreLockedError

    final = _final_path(entry.files[0])
    try:
        lock = FileLock(final.with_name(final.name + ".lock"), timeout=0.0)
    except (StoreLockedError, OSError) as error:
        logger.info("ONNX cache entry %s is in use (%s); kept", final, error)
        return False
    try:
        return remove_entry(CacheEntry(entry.name, tuple(f for f in entry.files if not f.name.endswith(".lock")),
                                       entry.nbytes, entry.last_used))
    finally:
        lock.release()
