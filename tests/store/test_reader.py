"""Tests of featcache.store.reader.FeatureStore."""

from __future__ import annotations

import pickle
import shutil

import h5py
import numpy as np
import pytest

from _support import synth_store as synth
from featcache.errors import ParamError
from featcache.store import (
    SPLITS,
    FeatureStore,
    StaleStoreError,
    StoreError,
    StoreNotFoundError,
)

KEPT = [r for r in range(synth.N) if r not in synth.SKIP]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return synth.write_all(tmp_path_factory.mktemp("store") / "tiny.h5")


@pytest.fixture
def store(store_path):
    with FeatureStore(store_path) as fs:
        yield fs


def test_metadata(store):
    assert store.backbone == "tiny" and store.n_rows == len(KEPT) == 34
    assert store.layers == ["pool", "fc"]  # writer order, not alphabetical
    assert store.classes == synth.CLASSES and store.task == "classification"
    assert store.config == synth.make_config()
    assert store.config_sha256 == store.attrs["config_sha256"]
    assert store.attrs["n_skipped"] == 3 and store.attrs["complete"] is True
    assert store.layer_info("pool") == {
        "node": "global_pool.flatten", "pooling": "avg", "map_shape": (5, 3, 3),
        "post_relu": True, "dim": 5, "dtype": "float16",
    }
    assert store.layer_info("fc")["map_shape"] == (3,)


@pytest.mark.parametrize("split", [None, *SPLITS])
def test_rows_by_split(store, split):
    rows = np.array(KEPT)
    sel = np.ones(rows.size, bool) if split is None else rows % 3 == SPLITS.index(split)
    ids = np.array(synth.make_ids())[rows[sel]]
    np.testing.assert_array_equal(store.split_mask(split), sel)
    np.testing.assert_array_equal(store.ids(split), ids)
    assert store.ids(split).dtype.kind == "U"
    np.testing.assert_array_equal(store.labels(split), rows[sel] % 3)
    assert store.labels(split).dtype == np.int64 and store.targets(split).dtype == np.float64
    for spec in synth.LAYERS:
        x = store.read(spec.alias, split)
        want = synth.features_for(spec.alias, rows[sel]).astype(np.float16).astype(np.float32)
        assert x.dtype == np.float32 and x.shape == (sel.sum(), spec.dim)
        np.testing.assert_array_equal(x, want)
        d = store.to_dask(spec.alias, split)
        assert d.shape == x.shape and d.dtype == np.float32
        np.testing.assert_array_equal(d.compute(), x)


def test_read_dtype_and_float32_store(tmp_path):
    path = synth.write_all(tmp_path / "f32.h5", dtype="float32")
    with FeatureStore(path) as fs:
        assert fs.layer_info("pool")["dtype"] == "float32"
        np.testing.assert_array_equal(
            fs.read("pool", dtype=np.float64), synth.features_for("pool", KEPT).astype(np.float32)
        )
        assert fs.read("fc", "test", dtype=np.float16).dtype == np.float16


def test_errors_table(store):
    ids = synth.make_ids()
    assert store.errors() == [(ids[r], synth.reason_for(ids[r])) for r in sorted(synth.SKIP)]


def test_regression_store(tmp_path):
    with FeatureStore(synth.write_all(tmp_path / "r.h5", regression=True)) as fs:
        assert fs.task == "regression" and fs.classes == []
        np.testing.assert_array_equal(fs.targets("val"), np.array(KEPT)[np.array(KEPT) % 3 == 1] * 0.5 - 1)


def test_to_dask_is_lazy_picklable_and_outlives_close(store_path):
    fs = FeatureStore(store_path)
    arr = fs.to_dask("pool", rows_per_chunk=8)
    assert arr.chunks[0] == (8, 8, 8, 8, 2)
    fs.close()
    again = pickle.loads(pickle.dumps(arr))  # what dask.distributed does with the graph
    np.testing.assert_array_equal(again.compute(), synth.features_for("pool", KEPT).astype(np.float16))
    np.testing.assert_array_equal(arr.sum(axis=0).compute(scheduler="threads"), again.compute().sum(axis=0))


def test_check_config_names_changed_keys(store):
    store.check_config(synth.make_config())  # equal: no error
    with pytest.raises(StaleStoreError) as info:
        store.check_config(synth.make_config(pooling="max", crop=0.875))
    msg = str(info.value)
    assert "extract.pooling: store has 'avg', params say 'max'" in msg
    assert "extract.crop: store has nothing, params say 0.875" in msg
    assert "dvc repro" in msg and "size" not in msg
    assert isinstance(info.value, StoreError)


@pytest.mark.parametrize(("key", "value"), [("size", 224.0), ("flag", True)])
def test_check_config_tells_equal_values_of_another_type_apart(tmp_path, key, value):
    """224 == 224.0 and 1 == True in Python; a store extracted with the one is not the other's."""
    stored = synth.make_config(flag=1)
    with FeatureStore(synth.write_all(tmp_path / "t.h5", config=stored)) as fs:
        fs.check_config(synth.make_config(flag=1))
        with pytest.raises(StaleStoreError, match=rf"extract\.{key}: store has"):
            fs.check_config(synth.make_config(**{"flag": 1, key: value}))


def test_unknown_layer_and_split(store):
    with pytest.raises(StoreError, match=r"unknown layer 'fc7'.*available: \['pool', 'fc'\]"):
        store.read("fc7")
    with pytest.raises(StoreError, match=r"unknown layer"):
        store.to_dask("fc7")
    with pytest.raises(StoreError, match=r"unknown split 'valid'; allowed: \['train', 'val', 'test'\]"):
        store.read("pool", "valid")


def test_wrong_split_type_and_dtype_name_what_is_allowed(store):
    with pytest.raises(StoreError, match=r"unknown split \['train'\]; allowed: \['train', 'val', 'test'\]"):
        store.labels(["train"])  # was a raw TypeError (unhashable list)
    for read in (store.read, store.to_dask):
        with pytest.raises(ParamError, match=r"dtype=<class 'numpy.int8'> is invalid; allowed: a float dtype"):
            read("pool", "train", dtype=np.int8)  # was silently truncated to integers
    assert store.read("pool", "train", dtype="float64").dtype == np.float64


def test_reading_a_closed_store_says_so(store_path):
    with FeatureStore(store_path) as fs:
        arr = fs.to_dask("pool", "train")
    for read in (lambda: fs.read("pool", "train"), lambda: fs.to_dask("pool"), lambda: fs.layer_info("pool"),
                 fs.errors):
        with pytest.raises(StoreError, match=r"tiny.h5 is closed; .*Hint: read inside the `with"):
            read()  # was a raw KeyError or ValueError from h5py
    assert fs.labels("train").size == arr.shape[0] == arr.compute().shape[0]  # in memory / lazy: still fine


def test_a_folder_is_not_a_store(store_path):
    with pytest.raises(StoreError, match=r"is a folder; allowed: a feature store file \(\.h5\).*tiny.h5"):
        FeatureStore(store_path.parent)


def test_missing_file(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist.*run the extraction") as info:
        FeatureStore(tmp_path / "nope.h5")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, StoreError)


def test_not_hdf5_is_named_as_such_and_never_to_be_deleted(tmp_path):
    """Another kind of file (a manifest.csv passed as --store) is no store to delete and extract again."""
    bad = tmp_path / "manifest.csv"
    bad.write_bytes(b"id,path,split,label,target\n")
    with pytest.raises(StoreError) as info:
        FeatureStore(bad)
    message = str(info.value)
    assert message.startswith(f"{bad} is not an HDF5 file (no HDF5 signature); allowed: a feature store (.h5) ")
    assert "Hint: pass the file `featcache extract --out` wrote" in message
    assert not message.split("(if it is one")[0].count("delete") and bad.exists()


def test_a_truncated_store_is_unreadable_delete_and_extract_again(tmp_path, store_path):
    cut = tmp_path / "cut.h5"
    cut.write_bytes(store_path.read_bytes()[:4000])
    with pytest.raises(StoreError, match=r"cut\.h5 is not a readable HDF5 file \(.*truncated file.*\); hint: delete it "
                                         "and rerun extraction"):
        FeatureStore(cut)


def test_a_damaged_chunk_is_a_store_error_naming_the_rows_and_layer(tmp_path, store_path):
    """A compressed chunk whose bytes were overwritten (a disk fault): a StoreError, not h5py's OSError."""
    bad = tmp_path / "bad.h5"
    shutil.copy(store_path, bad)
    with h5py.File(bad, "r") as f:
        chunk = f["features/pool"].id.get_chunk_info(0)
    data = bytearray(bad.read_bytes())
    data[chunk.byte_offset:chunk.byte_offset + chunk.size] = b"\xff" * chunk.size
    bad.write_bytes(bytes(data))
    with FeatureStore(bad) as fs, pytest.raises(StoreError) as info:
        fs.read("pool")
    message = str(info.value)
    assert message.startswith(f"{bad}: rows 0..") and "of layer 'pool' cannot be read (" in message
    assert "the file is damaged. Hint: delete it and extract again" in message and "--force" in message


@pytest.mark.parametrize(
    ("attr", "value", "pattern"),
    [
        ("complete", False, "incomplete store .*rerun extraction"),
        ("format", "featcache-features/0", "has format 'featcache-features/0'"),
    ],
)
def test_rejects_incomplete_or_foreign_format(tmp_path, store_path, attr, value, pattern):
    copy = tmp_path / "copy.h5"
    shutil.copy(store_path, copy)
    with h5py.File(copy, "a") as f:  # a test fixture edit, never done by featcache
        f.attrs[attr] = value
    with pytest.raises(StoreError, match=pattern):
        FeatureStore(copy)


def test_empty_store_reads(tmp_path):
    with FeatureStore(synth.write_all(tmp_path / "e.h5", n=0)) as fs:
        assert fs.n_rows == 0 and fs.task == "regression" and fs.errors() == []
        assert fs.read("pool", "train").shape == (0, 5)
        assert fs.to_dask("fc").compute().shape == (0, 3)


def test_to_dask_on_distributed_workers(store_path):
    import distributed  # a declared dependency: fail, not skip, without it
    fs = FeatureStore(store_path)
    want = fs.read("pool", "train")
    arr = fs.to_dask("pool", "train", rows_per_chunk=8)
    fs.close()
    with distributed.LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster, distributed.Client(cluster):
        np.testing.assert_array_equal(arr.compute(), want)
