"""Fused layer names (``pool+fc``): FeatureStore reads several layers of one store side by side."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from _support import synth_store as synth
from featcache.errors import ParamError
from featcache.store import SPLITS, FeatureStore, StoreError
from featcache.store.schema import LAYER_SEPARATOR, layer_parts

KEPT = np.array([r for r in range(synth.N) if r not in synth.SKIP])


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    return synth.write_all(tmp_path_factory.mktemp("fused") / "tiny.h5")


@pytest.fixture
def store(store_path):
    with FeatureStore(store_path) as fs:
        yield fs


def test_layer_parts():
    assert LAYER_SEPARATOR == "+"
    assert layer_parts("pool") == ("pool",)
    assert layer_parts("features.12") == ("features.12",)
    assert layer_parts("pool+block6+head") == ("pool", "block6", "head")


@pytest.mark.parametrize(("name", "pattern"), [
    ("pool+", r"layer 'pool\+' has an empty part; allowed: .*joined by '\+'.*Hint: remove the stray '\+'"),
    ("+pool", r"layer '\+pool' has an empty part"),
    ("pool++fc", r"layer 'pool\+\+fc' has an empty part"),
    ("pool+ ", r"has an empty part"),
    ("pool+fc+pool", r"layer 'pool\+fc\+pool' names \['pool'\] more than once; allowed: .*Hint: list each layer once"),
])
def test_layer_parts_refuses_empty_and_repeated_parts(name, pattern):
    with pytest.raises(ParamError, match=pattern):
        layer_parts(name)


@pytest.mark.parametrize("split", [None, *SPLITS])
@pytest.mark.parametrize("name", ["pool+fc", "fc+pool"])
def test_read_and_to_dask_of_a_fused_name_are_the_parts_side_by_side(store, split, name):
    parts = [store.read(part, split) for part in name.split("+")]
    want = np.hstack(parts)
    got = store.read(name, split)
    assert got.dtype == np.float32 and got.shape == (parts[0].shape[0], 5 + 3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(store.read(name, split, dtype=np.float64), want.astype(np.float64))
    lazy = store.to_dask(name, split)
    assert lazy.shape == want.shape and lazy.dtype == np.float32
    np.testing.assert_array_equal(lazy.compute(), want)


def test_a_single_layer_reads_as_before(store):
    for alias in ("pool", "fc"):
        want = synth.features_for(alias, KEPT).astype(np.float16).astype(np.float32)
        assert store.read(alias).tobytes() == want.tobytes()
        assert store.to_dask(alias).compute().tobytes() == want.tobytes()


def test_fused_to_dask_chunks_every_part_alike_and_pickles(store_path):
    fs = FeatureStore(store_path)
    arr = fs.to_dask("pool+fc", rows_per_chunk=8)
    assert arr.chunks == ((8, 8, 8, 8, 2), (5, 3))
    fs.close()
    again = pickle.loads(pickle.dumps(arr))
    want = np.hstack([synth.features_for(alias, KEPT).astype(np.float16) for alias in ("pool", "fc")])
    np.testing.assert_array_equal(again.compute(), want)


def test_layer_info_of_a_fused_name(store):
    info = store.layer_info("pool+fc")
    pool, fc = store.layer_info("pool"), store.layer_info("fc")
    assert info == {"node": f"{pool['node']}+{fc['node']}", "pooling": f"{pool['pooling']}+{fc['pooling']}",
                    "dim": 8, "dtype": "float16", "parts": [pool, fc]}
    assert store.layer_info("pool") == {"node": "global_pool.flatten", "pooling": "avg", "map_shape": (5, 3, 3),
                                        "post_relu": True, "dim": 5, "dtype": "float16"}


def test_a_fused_name_with_an_unknown_or_bad_part_is_a_store_error(store):
    for call in (store.read, store.to_dask, store.layer_info):
        with pytest.raises(StoreError, match=r"layer 'pool\+fc7' fuses \['fc7'\], which is not stored in .*"
                                             r"available: \['pool', 'fc'\] \(or several of them joined by '\+'\)"):
            call("pool+fc7")
    with pytest.raises(StoreError, match=r"names \['pool'\] more than once.*layers of .*: \['pool', 'fc'\]"):
        store.read("pool+pool")
    with pytest.raises(StoreError, match=r"unknown layer 'fc7'.*available: \['pool', 'fc'\]\. Hint"):
        store.read("fc7")
