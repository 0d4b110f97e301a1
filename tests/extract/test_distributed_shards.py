"""A sharded extraction on 2 local dask workers is byte-identical to a single process.

The manifest of WebDataset shards (member rows, byte ranges, the shard list
with its hashes) travels to the workers like any manifest; one member is
corrupt, so the error table must agree too.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import distributed
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from _support.files import md5
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.distributed import extract_distributed
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.inputs.sharded import from_shards
from featcache.extract.plan import plan_extraction
from featcache.extract.runner_spec import RunnerSpec
from featcache.store import FeatureStore

PREPROCESS = Preprocessor(input_size=64, resize_size=73, interpolation="bilinear",
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
SPEC = RunnerSpec(backbone="resnet18", weights="random", layers=("default",), pooling="avg")
CONFIG = {"backbone": "resnet18", "weights": "random", "layers": ["default"], "pooling": "avg", "dtype": "float16",
          "preprocess": PREPROCESS.config()}
ATTRS = {"backbone": "resnet18", "weights_id": "random:seed=0", "weights_sha256": "", "dataset": "tiny",
         "backend": "torch", "provider": "cpu"}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Manifest:
    root = tmp_path_factory.mktemp("dshards")
    rng = np.random.default_rng(0)
    for shard in range(3):
        with wds.TarWriter(str(root / f"{shard:06d}.tar")) as writer:
            for index in range(6):
                pixels = rng.integers(0, 255, size=(50, 60, 3)).astype(np.uint8)
                buffer = BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                data = b"not a png" if (shard, index) == (1, 2) else buffer.getvalue()
                writer.write({"__key__": f"s{index}", "png": data, "cls": "ab"[index % 2]})
    from_shards(str(root), root / "prepared" / "manifest.csv", {"train": 0.6, "val": 0.2, "test": 0.2}, 0)
    return Manifest.read(root / "prepared" / "manifest.csv")


def test_two_workers_write_the_bytes_of_one_process(manifest: Manifest, tmp_path: Path):
    single = extract_to_store(manifest, SPEC.build(), PREPROCESS, tmp_path / "single.h5", config=CONFIG, attrs=ATTRS,
                              block_rows=4, batch_size=4, progress=False,
                              plan=plan_extraction(device="cpu", backend="torch", num_workers=0))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        extract_distributed(manifest, SPEC, PREPROCESS, tmp_path / "dask.h5", config=CONFIG, attrs=ATTRS,
                            block_rows=4, batch_size=4, client=client, progress=False)
    assert single.errors == [("000001/s2", single.errors[0][1])] and single.errors[0][1]
    with FeatureStore(tmp_path / "dask.h5") as store:
        assert store.errors() == single.errors and "shards" in store.attrs
    assert md5(tmp_path / "dask.h5") == md5(tmp_path / "single.h5")
