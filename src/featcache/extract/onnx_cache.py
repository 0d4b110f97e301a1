"""A cache of ONNX exports, keyed by everything that changes the exported graph.

Exporting a backbone takes seconds (more for VGG16) and gives the same graph
for the same inputs, so :func:`cached_export` keeps each export in a cache
folder under a key built from

* the backbone, and the sha256 of the weights in the truncated module
  (so ``random``, ``pretrained`` and a local ``.pth`` never share an entry),
* the layers (alias, graph node, dimension), the pooling and the input size,
* the opset and the exporter,
* the torch and onnx versions and featcache's :data:`~featcache.extract.onnx_export.EXPORT_CODE_VERSION`.

Layout: ``<cache>/<backbone>-<key>.onnx`` and a sidecar ``<...>.onnx.json``
(the key's fields and the file's sha256). Entries are written to temporary
files and published with ``os.replace`` under an exclusive file lock, so
concurrent processes never read a half-written entry and export a missing key
once. An entry whose file is missing or whose sha256 differs from its sidecar
(corrupt, truncated) is logged and rebuilt.

Where the cache lives (:func:`resolve_cache_dir`): the ``extract.onnx_cache``
param (a folder, ``auto`` or ``none``), else ``$FEATCACHE_CACHE_DIR/onnx``,
else ``$XDG_CACHE_HOME/featcache/onnx`` (``~/.cache/featcache/onnx``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

import onnx
import torch

import featcache.extract.onnx_export as onnx_export
from featcache.extract.torch_runner import TorchFeatureExtractor
from featcache.store.lock import FileLock
from featcache.store.schema import canonical_json

__all__ = ["CACHE_ENV", "cache_key", "cached_export", "default_cache_dir", "entry_path", "file_sha256_hex",
           "resolve_cache_dir", "state_sha256"]

logger = logging.getLogger(__name__)

#: Environment variable naming featcache's cache root (ONNX exports go to its ``onnx/`` folder).
CACHE_ENV = "FEATCACHE_CACHE_DIR"

#: Seconds to wait for another process exporting the same key.
LOCK_TIMEOUT = 1800.0


def default_cache_dir() -> Path:
    """``$FEATCACHE_CACHE_DIR/onnx``, else ``$XDG_CACHE_HOME/featcache/onnx`` (default ``~/.cache``)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "featcache" / "onnx"


def resolve_cache_dir(setting: str | os.PathLike[str] | None) -> Path | None:
    """The cache folder of an ``extract.onnx_cache`` setting.

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


def state_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict: every name, dtype, shape and byte, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def file_sha256_hex(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_key(extractor: TorchFeatureExtractor, opset: int, input_size: int | None, exporter: str) -> dict[str, Any]:
    """Every input that changes the graph :func:`~featcache.extract.onnx_export.export_onnx` writes.

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
        "exporter": onnx_export.resolve_exporter(exporter, opset),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "export_code_version": onnx_export.EXPORT_CODE_VERSION,
    }


def entry_path(cache_dir: str | os.PathLike[str], key: dict[str, Any]) -> Path:
    """The ``.onnx`` file of a :func:`cache_key` in ``cache_dir``: ``<backbone>-<sha256 of the key>.onnx``."""
    digest = hashlib.sha256(canonical_json(key).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"{key['backbone']}-{digest}.onnx"


def _verified(path: Path, sidecar: Path) -> str | None:
    """The entry's sha256 if its file matches its sidecar; None (logged) if it is missing or corrupt."""
    if not path.is_file() and not sidecar.is_file():
        return None
    try:
        expected = json.loads(sidecar.read_text(encoding="utf-8"))["sha256"]
        actual = file_sha256_hex(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("ONNX cache entry %s is unreadable (%s: %s); rebuilding it.", path, type(error).__name__, error)
        return None
    if actual != expected:
        logger.warning("ONNX cache entry %s is corrupt or truncated (sha256 %s..., sidecar says %s...); rebuilding it.",
                       path, actual[:12], str(expected)[:12])
        return None
    return actual


def cached_export(extractor: TorchFeatureExtractor, cache_dir: str | os.PathLike[str],
                  opset: int = onnx_export.DEFAULT_OPSET, input_size: int | None = None, *,
                  exporter: str = "auto") -> tuple[Path, str]:
    """Export ``extractor`` to ONNX through the cache: reuse a verified entry, else export and publish one.

    Parameters
    ----------
    extractor : TorchFeatureExtractor
        As for :func:`~featcache.extract.onnx_export.export_onnx`.
    cache_dir : path-like
        The cache folder (created if missing).
    opset, input_size, exporter
        As for :func:`~featcache.extract.onnx_export.export_onnx`.

    Returns
    -------
    path : Path
        The cached ``.onnx`` file (read it, do not modify it).
    sha256 : str
        Its sha256 (hex), verified against the sidecar.
    """
    key = cache_key(extractor, opset, input_size, exporter)
    path = entry_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_name(path.name + ".json")
    if (sha := _verified(path, sidecar)) is not None:
        logger.info("ONNX export cache hit: %s", path)
        return path, sha
    with FileLock(path.with_name(path.name + ".lock"), timeout=LOCK_TIMEOUT):
        if (sha := _verified(path, sidecar)) is not None:  # another process published it meanwhile
            return path, sha
        partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            onnx_export.export_onnx(extractor, partial, opset=opset, input_size=input_size, exporter=exporter)
            sha = file_sha256_hex(partial)
            partial_sidecar = partial.with_name(partial.name + ".json")
            partial_sidecar.write_text(json.dumps({"sha256": sha, "key": key}, indent=1, sort_keys=True) + "\n",
                                       encoding="utf-8")
            os.replace(partial, path)
            os.replace(partial_sidecar, sidecar)
        finally:
            partial.unlink(missing_ok=True)
            partial.with_name(partial.name + ".json").unlink(missing_ok=True)
    logger.info("ONNX export cached: %s", path)
    return path, sha
