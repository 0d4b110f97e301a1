"""Rows that a server failed for a transient cause (down, overloaded) are read again by the next run.

An outage during a long extraction over URLs makes every read fail after its
tries; those rows are committed as bad images (the run goes on, or stops at
``max_bad_fraction``). A rerun once the server is back must read them again,
not keep the outage in the store for good: the final file then equals an
uninterrupted run's. A row that is really bad (404) stays bad and is not read
again. Random-weight resnet18 on 32 px inputs, a loopback HTTP server.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from _support.files import md5
from _support.shards import LoopbackServer
from featcache.errors import ExtractionError
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.manifest import Manifest
from featcache.extract.inputs.sources import from_csv
from featcache.extract.inputs.storage import StorageOptions, describe_failure, is_transient_reason
from featcache.extract.plan import plan_extraction
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.registry import IMAGENET_MEAN, IMAGENET_STD
from featcache.store import FeatureStore

PRE = Preprocessor(input_size=32, resize_size=36, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
CONFIG = {"backbone": "resnet18", "weights": "random", "layers": ["pool5"], "preprocess": PRE.config()}
ATTRS = {"backbone": "resnet18", "weights_id": "random:seed=0", "weights_sha256": "", "backend": "torch"}
FAST = StorageOptions(timeout=5.0, tries=2, backoff=0.0)


def test_stored_reasons_of_transient_failures_are_told_from_bad_images():
    class Status(Exception):
        def __init__(self, status):
            self.status = status

    assert is_transient_reason(describe_failure(TimeoutError(), 3, FAST))
    assert is_transient_reason(describe_failure(ConnectionResetError("reset"), 3, FAST))
    assert is_transient_reason(describe_failure(Status(503), 3, FAST, "https"))
    assert is_transient_reason(describe_failure(Status(429), 3, FAST, "https"))
    for reason in (describe_failure(Status(404), 1, FAST, "https"), describe_failure(Status(403), 1, FAST, "https"),
                   "missing file", "truncated member (the shard ends after 10 of its 20 bytes)",
                   "not an image or unsupported format (x)", "truncated or corrupt image (timeout after 3 tries)"):
        assert not is_transient_reason(reason), reason


@pytest.fixture(scope="module")
def runner(random_backbone):
    loaded = random_backbone("resnet18")
    return TorchFeatureExtractor(loaded.model, loaded.spec, ["pool5"], pooling="avg")


def _extract(manifest: Manifest, runner, out):
    return extract_to_store(manifest, runner, PRE, out, plan=plan_extraction(device="cpu", backend="torch",
                                                                             num_workers=0),
                            batch_size=2, block_rows=2, progress=False, config=CONFIG, attrs=ATTRS,
                            max_bad_fraction=0.2)


def test_rows_a_server_failed_are_read_again_by_the_rerun(runner, tmp_path):
    images = tmp_path / "served"
    images.mkdir()
    for i in range(6):
        buffer = io.BytesIO()
        Image.fromarray(np.full((20, 20, 3), 30 * i, dtype=np.uint8)).save(buffer, format="PNG")
        (images / f"img{i}.png").write_bytes(buffer.getvalue())
    folder = tmp_path / "csv"
    folder.mkdir()
    with LoopbackServer(images) as server:
        rows = [f"{server.url}img{i}.png,{'ab'[i % 2]},x{i}" for i in range(6)] + [f"{server.url}gone.png,a,x6"]
        (folder / "labels.csv").write_text("path,label,id\n" + "\n".join(rows) + "\n")
        from_csv(folder / "labels.csv", {"train": 1.0}, 0).write(folder / "prepared" / "manifest.csv")
        manifest = Manifest.read(folder / "prepared" / "manifest.csv", storage=FAST)
        clean = _extract(manifest, runner, tmp_path / "clean" / "store.h5")  # 1 of 7 bad (the 404): finalized

        out = tmp_path / "out" / "store.h5"
        server.fail("img3.png", FAST.tries)  # down for every try of the first run: 2 of 7 bad, it stops
        with pytest.raises(ExtractionError, match=r"x3: unreadable object \(HTTP 503 Service Unavailable after 2"):
            _extract(manifest, runner, out)
        assert len(list(out.parent.glob("store.h5.parts/*/block-*.h5"))) == 4  # committed, with the 503 in one
        gone = server.requests["gone.png"]
        report = _extract(manifest, runner, out)  # the server is back
        assert server.requests["gone.png"] == gone  # the 404 is a bad image for good: its block is not read again
    assert report.n_resumed_blocks == 3 and report.errors == [("x6", "missing object (404 not found)")]
    with FeatureStore(out) as store:
        assert "x3" in list(store.ids())
    assert md5(out) == md5(clean.path)
