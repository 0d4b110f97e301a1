"""Extraction engine: manifest + backbone + runner -> one HDF5 feature store.

Rows are read by DataLoader workers (decode + preprocess overlap the forward
pass), run through the backbone in large batches, and committed to the store
in row blocks. A crash loses at most the block in flight: a rerun with the
same config extracts only the blocks that are missing.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

import featcache
from featcache.errors import UserError
from featcache.extract.data import ImageDataset, make_loader
from featcache.extract.manifest import Manifest
from featcache.extract.preprocess import Preprocessor
from featcache.store.reader import FeatureStore
from featcache.store.schema import canonical_json, sha256_text
from featcache.store.writer import LayerSpec, StoreWriter

__all__ = ["ExtractionError", "ExtractionReport", "FeatureRunner", "extract_to_store", "resolve_device"]

logger = logging.getLogger(__name__)


class ExtractionError(UserError, RuntimeError):
    """Extraction stopped (``on_error: fail`` on a bad image, or a runner error)."""


class FeatureRunner(Protocol):
    """What the engine needs from a backend (torch or ONNX)."""

    def __call__(self, batch: torch.Tensor) -> dict[str, np.ndarray]: ...

    def layer_specs(self, input_size: int | None = None) -> list[LayerSpec]: ...


@dataclass
class ExtractionReport:
    """What one extraction did."""

    path: Path
    n_input: int
    n_written: int
    n_skipped: int
    n_resumed_blocks: int
    seconds: float
    images_per_second: float
    errors: list[tuple[str, str]] = field(default_factory=list)


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; validates explicit values."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ExtractionError("extract.device is 'cuda' but no CUDA device is visible. Hint: use 'auto' or 'cpu'.")
    return device


def extract_to_store(
    manifest: Manifest,
    runner: FeatureRunner,
    preprocess: Preprocessor,
    out: str | Path,
    *,
    config: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
    dtype: str = "float16",
    batch_size: int = 64,
    num_workers: int | None = None,
    block_rows: int = 512,
    on_error: str = "skip",
    pin_memory: bool = False,
    progress: bool = True,
    lock_timeout: float = 0.0,
) -> ExtractionReport:
    """Extract every manifest row with ``runner`` and write one feature store.

    Parameters
    ----------
    manifest : Manifest
        N images with ids, labels/targets and splits.
    runner : FeatureRunner
        Maps a (B, 3, S, S) batch to ``{layer: (B, D) array}``.
    preprocess : Preprocessor
        Image -> (3, S, S) tensor, as the runner expects.
    out : path
        Final ``.h5`` path (written atomically).
    config : mapping
        Every extraction-relevant param; stored as canonical JSON with its
        sha256. A different config never resumes or appends to old blocks.
    attrs : mapping, optional
        Extra root attributes (backbone, weights_id, backend, ...).
    on_error : {"skip", "fail"}
        Bad images are reported by id and reason; ``skip`` drops their rows,
        ``fail`` stops before the final file is written.

    Returns
    -------
    ExtractionReport
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error {on_error!r} is not one of 'skip', 'fail'.")
    started = time.perf_counter()
    config_json = canonical_json(config)
    root_attrs = {
        "config": config_json,
        "config_sha256": sha256_text(config_json),
        "manifest_sha256": manifest.sha256(),
        "featcache_version": featcache.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "python_version": platform.python_version(),
        **dict(attrs or {}),
    }
    layer_specs = runner.layer_specs(preprocess.input_size)
    dataset = ImageDataset(manifest, preprocess)
    with StoreWriter(out, ids=manifest.ids, splits=manifest.splits, classes=manifest.classes,
                     labels=manifest.labels, targets=manifest.targets, layers=layer_specs, attrs=root_attrs,
                     dtype=dtype, block_rows=block_rows, lock_timeout=lock_timeout) as writer:
        pending = writer.pending_blocks()
        n_resumed = writer.n_blocks - len(pending)
        if n_resumed:
            logger.info("Resuming %s: %d of %d blocks already committed", out, n_resumed, writer.n_blocks)
        rows = [row for block in pending for row in writer.block_range(block)]
        errors = _run_blocks(manifest, runner, dataset, writer, layer_specs, pending, rows, batch_size,
                             num_workers, pin_memory, on_error, progress)
        path = writer.finalize()
    # Count from the store: bad images of blocks committed by an earlier (resumed) run are not in `errors`.
    with FeatureStore(path) as store:
        errors = store.errors()
    seconds = time.perf_counter() - started
    n_skipped = len(errors)
    report = ExtractionReport(path=Path(path), n_input=len(manifest), n_written=len(manifest) - n_skipped,
                              n_skipped=n_skipped, n_resumed_blocks=n_resumed, seconds=seconds,
                              images_per_second=len(rows) / seconds if seconds > 0 else 0.0, errors=errors)
    logger.info("Wrote %s: %d rows, %d skipped, %.1f img/s", path, report.n_written, n_skipped,
                report.images_per_second)
    return report


def _run_blocks(manifest: Manifest, runner: FeatureRunner, dataset: ImageDataset, writer: StoreWriter,
                layer_specs: Sequence[LayerSpec], pending: Sequence[int], rows: Sequence[int], batch_size: int, num_workers: int | None,
                pin_memory: bool, on_error: str, progress: bool) -> list[tuple[str, str]]:
    """Stream rows through the runner and commit each block as soon as it is complete."""
    all_errors: list[tuple[str, str]] = []
    if not rows:
        return all_errors
    block_of = {row: block for block in pending for row in writer.block_range(block)}
    buffers: dict[int, dict[str, Any]] = {}
    remaining = {block: len(writer.block_range(block)) for block in pending}
    loader = make_loader(dataset, rows, batch_size, num_workers, pin_memory=pin_memory)
    bar = tqdm(total=len(rows), desc=f"extract {Path(writer.path).name}", unit="img", disable=not progress)
    try:
        for batch_rows, images, reasons in loader:
            good = [i for i, reason in enumerate(reasons) if not reason]
            bad = [i for i, reason in enumerate(reasons) if reason]
            for i in bad:
                row = int(batch_rows[i])
                logger.warning("Bad image %s (%s): %s", manifest.ids[row], manifest.paths[row], reasons[i])
                if on_error == "fail":
                    raise ExtractionError(
                        f"Bad image {manifest.ids[row]!r} ({manifest.absolute_path(row)}): {reasons[i]}. "
                        "Nothing was written to the final file. Hint: fix or remove it, or set "
                        "extract.on_error: skip to skip and report bad images."
                    )
            features = runner(images[good]) if good else {}
            for position, i in enumerate(good):
                row = int(batch_rows[i])
                buffer = buffers.setdefault(block_of[row], {"rows": [], "features": [], "errors": []})
                buffer["rows"].append(row)
                buffer["features"].append({name: value[position] for name, value in features.items()})
            for i in bad:
                row = int(batch_rows[i])
                buffer = buffers.setdefault(block_of[row], {"rows": [], "features": [], "errors": []})
                buffer["errors"].append((manifest.ids[row], reasons[i]))
                all_errors.append((manifest.ids[row], reasons[i]))
            for row in (int(r) for r in batch_rows):
                remaining[block_of[row]] -= 1
            for block in [b for b in list(buffers) if remaining[b] == 0]:
                _commit(writer, block, buffers.pop(block), layer_specs)
            bar.update(len(batch_rows))
    finally:
        bar.close()
    return all_errors


def _commit(writer: StoreWriter, block: int, buffer: dict[str, Any], layer_specs: Sequence[LayerSpec]) -> None:
    kept = np.asarray(buffer["rows"], dtype=np.int64)
    order = np.argsort(kept, kind="stable")
    features = {
        spec.alias: np.stack([buffer["features"][i][spec.alias] for i in order]) if len(order)
        else np.zeros((0, spec.dim), dtype=np.float32)
        for spec in layer_specs
    }
    writer.commit_block(block, kept[order], features, errors=buffer["errors"])
