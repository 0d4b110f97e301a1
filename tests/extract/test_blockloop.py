"""featcache.extract.blockloop: every loader reads the rows of the reader it is given."""

from __future__ import annotations

import io

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from featcache.extract.blockloop import make_batches
from featcache.extract.decode.loaders import ImageDataset, ImageReader
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.inputs.sharded import from_shards

PRE = Preprocessor(32, 36, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _png(value: int, size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def shard_manifest(tmp_path) -> Manifest:
    """Four PNG members in one WebDataset .tar (each row a member of the same shard)."""
    path = tmp_path / "000000.tar"
    with wds.TarWriter(str(path)) as writer:
        for i, value in enumerate((10, 80, 150, 220)):
            writer.write({"__key__": f"s{i}", "png": _png(value), "cls": "x"})
    from_shards(str(path), tmp_path / "m.csv", {"train": 0.5, "val": 0.25, "test": 0.25}, 0, split_key=None)
    return Manifest.read(tmp_path / "m.csv")


def test_torch_loader_reads_the_shard_members_of_a_given_reader(shard_manifest):
    """An ImageReader over tar members, given to the torch loader: each row is its member, not the whole .tar."""
    reader = ImageReader(shard_manifest, PRE)
    rows = list(range(len(shard_manifest)))
    [(batch_rows, images, reasons)] = list(make_batches("torch", shard_manifest, rows, PRE, batch_size=4,
                                                        num_workers=0, dataset=reader))
    assert reasons == [""] * 4
    _, expected, expected_reasons = reader.read_batch(rows)  # the arrays loader's reading of the same rows
    assert expected_reasons == [""] * 4
    np.testing.assert_array_equal(images.numpy(), expected)
    assert batch_rows.tolist() == rows


def test_as_dataset_keeps_every_field_of_the_reader(shard_manifest):
    reader = ImageReader(shard_manifest, PRE)
    dataset = reader.as_dataset()
    assert isinstance(dataset, ImageDataset) and dataset.members is reader.members
    assert (dataset.paths, dataset.storage, dataset.preprocess) == (reader.paths, reader.storage, reader.preprocess)
    assert dataset[1][2] == "" and dataset.as_dataset() is dataset
