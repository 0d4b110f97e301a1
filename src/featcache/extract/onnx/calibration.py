"""The images an int8 graph is calibrated and checked on: deterministic samples of the user's own rows.

Calibration rows come from the *train* split only; the parity gate's
held-out rows from *val* (else from train rows outside the calibration
sample); the test split is never read. Rows are ordered by the sha256 of
their id, so a sample does not depend on the manifest's order or on the
other rows, and the same params give the same sample on every machine.
Images are read exactly as the extraction reads them
(:class:`~featcache.extract.decode.loaders.ImageReader`: the same decoder,
draft scale and crop), so calibration sees the pixels the graph will see.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from featcache.errors import ExtractionError
from featcache.extract.decode.loaders import ImageReader
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest
from featcache.store.schema import SPLIT_CODES

__all__ = ["CalibrationImages", "calibration_images", "hash_order"]

logger = logging.getLogger(__name__)


def hash_order(ids: Sequence[str], rows: np.ndarray) -> list[int]:
    """``rows`` sorted by the sha256 of their id: a fixed pseudo-random order that needs no seed."""
    return sorted((int(row) for row in rows), key=lambda row: hashlib.sha256(ids[row].encode()).digest())


@dataclass(frozen=True)
class CalibrationImages:
    """Preprocessed images of the calibration and held-out samples.

    Attributes
    ----------
    calibration : numpy.ndarray
        (Nc, 3, S, S) float32 normalised train images.
    holdout : numpy.ndarray
        (Nh, 3, S, S) float32 normalised held-out images.
    holdout_split : str
        ``val``, or ``train`` (rows outside the calibration sample) when there is no val split.
    sha256 : str
        sha256 of both samples' ids and input bytes: part of the int8 cache key.
    skipped : int
        Sampled rows that are bad images (left out of both samples).
    """

    calibration: np.ndarray
    holdout: np.ndarray
    holdout_split: str
    sha256: str
    skipped: int

    def facts(self) -> dict[str, object]:
        """What the store records about the samples."""
        return {"int8_calibration_rows": len(self.calibration), "int8_holdout_rows": len(self.holdout),
                "int8_holdout_split": self.holdout_split, "int8_samples_sha256": self.sha256}


def _read(reader: ImageReader, preprocess: Preprocessor, ids: Sequence[str], rows: Sequence[int],
          digest: "hashlib._Hash") -> tuple[np.ndarray, int]:
    """Normalised images of the good ``rows`` (feeding ``digest``) and the count of bad ones."""
    size = preprocess.input_size
    if not rows:
        return np.zeros((0, 3, size, size), np.float32), 0
    _, pixels, reasons = reader.read_batch(rows)
    good = [index for index, reason in enumerate(reasons) if not reason]
    for index, reason in enumerate(reasons):
        if reason:
            logger.warning("int8 calibration: skipping bad image %s (%s)", ids[rows[index]], reason)
    for index in good:
        digest.update(ids[rows[index]].encode() + b"\0")
        digest.update(pixels[index].tobytes())
    normalised = preprocess.normalize_batch(pixels[good])
    return np.ascontiguousarray(normalised, dtype=np.float32), len(rows) - len(good)


def calibration_images(manifest: Manifest, preprocess: Preprocessor, n_calibration: int,
                       n_holdout: int) -> CalibrationImages:
    """Read the calibration sample (train) and the held-out sample (val, else other train rows).

    Parameters
    ----------
    manifest : Manifest
        The rows being extracted.
    preprocess : Preprocessor
        The backbone's preprocessing (the same as the extraction's).
    n_calibration : int
        Train rows to calibrate on (fewer when the split is smaller).
    n_holdout : int
        Held-out rows of the parity gate.

    Raises
    ------
    featcache.errors.ExtractionError
        When the manifest has no train row, or no row is left for the held-out sample.
    """
    train = hash_order(manifest.ids, np.flatnonzero(manifest.splits == SPLIT_CODES["train"]))
    val = hash_order(manifest.ids, np.flatnonzero(manifest.splits == SPLIT_CODES["val"]))
    if not train:
        raise ExtractionError(f"extract.precision: int8 calibrates on the train split, but the manifest's "
                              f"{len(manifest)} rows have none (splits: {manifest.split_counts()}). Hint: give "
                              "data.split a train share, or use extract.precision: float32.")
    calibration_rows = train[:n_calibration]
    holdout_split, holdout_rows = ("val", val[:n_holdout]) if val else ("train", train[n_calibration:][:n_holdout])
    if not holdout_rows:
        raise ExtractionError(f"extract.precision: int8 checks the quantized graph on val rows (or train rows "
                              f"outside the {len(calibration_rows)} calibration rows), and there are none. Hint: "
                              "lower extract.int8_calibration, or add a val split.")
    reader = ImageReader(manifest, preprocess)
    digest = hashlib.sha256(f"{preprocess.config()}".encode())
    calibration, bad_c = _read(reader, preprocess, manifest.ids, calibration_rows, digest)
    digest.update(b"--holdout--")
    holdout, bad_h = _read(reader, preprocess, manifest.ids, holdout_rows, digest)
    if not len(calibration) or not len(holdout):
        empty = "train" if not len(calibration) else holdout_split
        raise ExtractionError(f"extract.precision: int8: every sampled {empty} "
                              "image is a bad image; nothing to calibrate or check on. Hint: see the warnings above.")
    logger.info("int8: %d calibration rows (train), %d held-out rows (%s)", len(calibration), len(holdout),
                holdout_split)
    return CalibrationImages(calibration, holdout, holdout_split, digest.hexdigest(), bad_c + bad_h)
