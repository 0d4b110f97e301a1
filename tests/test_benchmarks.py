"""The benchmark scripts' end-to-end helpers still run against the library's current API (tiny inputs)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_extract(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("bench_extract")


def test_bench_extract_end_to_end_runs(bench_extract, tmp_path):
    """The ``ratio`` case's ``extract_to_store`` call (it broke silently once when the engine's arguments moved)."""
    manifest = bench_extract.make_images(tmp_path / "images", 6, "digits")
    assert bench_extract.end_to_end(manifest, batch_size=4, workers=0) > 0


def test_bench_gpu_reports_a_failing_case_and_measures_the_others(monkeypatch, capsys):
    """One GPU call comes 15 minutes at a time: a case that raises is reported, the others still get numbers."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench_gpu = importlib.import_module("bench_gpu")
    calls = {"ok": 0, "broken": 0}

    def ok():
        calls["ok"] += 1

    def broken():
        calls["broken"] += 1
        raise RuntimeError("CUDA error: an illegal memory access")

    results = bench_gpu.interleaved({"ok": ok, "broken": broken}, n_images=10, repeats=3, device="cpu")
    assert calls == {"ok": 4, "broken": 1}  # warm-up + 3 rounds; the broken case never again
    assert results["broken"] == {"img_per_s": None, "error": "RuntimeError: CUDA error: an illegal memory access"}
    assert results["ok"]["img_per_s"] > 0 and len(results["ok"]["runs"]) == 3
    assert "case broken failed" in capsys.readouterr().out
    rates = {"gpu-decode": 100.0, "forward": None}
    assert bench_gpu.ratio_text(rates, "gpu-decode", "forward") == "n/a"


def test_bench_gpu_rounds_stop_at_the_deadline(monkeypatch):
    """Past its deadline a backbone runs no further round (the first always runs); without one, every round."""
    import time

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_gpu")
    calls = []
    cases = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    results = bench.interleaved(cases, 10, 3, "cpu", deadline=time.perf_counter() - 1)
    assert calls == ["a", "b", "a", "b"] and [len(results[c]["runs"]) for c in cases] == [1, 1]
    calls.clear()
    results = bench.interleaved(cases, 10, 3, "cpu")
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"] and [len(results[c]["runs"]) for c in cases] == [3, 3]


def test_bench_gpu_reports_a_failing_backbone_and_measures_the_next(tmp_path, monkeypatch):
    """A backbone whose setup raises (its load, its forward, a CUDA graph capture) is reported failed in the JSON
    and the table, and the next one is still measured; without a graphed runner only gpu-graphs fails."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_gpu")
    monkeypatch.setattr(bench, "start_cluster", lambda n_workers, stack: "not started in this test")
    make_jpegs = bench.make_jpegs
    monkeypatch.setattr(bench, "make_jpegs", lambda *args, **kwargs: make_jpegs(*args, **{**kwargs, "processes": 1}))

    def fake_backbone(name, manifest, root, work, client, args, deadline):
        if name == "broken":
            raise RuntimeError("CUDA error: out of memory")
        return {case: {"img_per_s": 1.0} for case in bench.CASES}

    monkeypatch.setattr(bench, "bench_backbone", fake_backbone)
    report = bench.main(["--out", str(tmp_path), "--images", "2", "--workers", "0", "--device", "cpu",
                         "--backbones", "broken,resnet18"])
    assert report["results"]["broken"]["forward"] == {"img_per_s": None,
                                                      "error": "RuntimeError: CUDA error: out of memory"}
    assert report["results"]["resnet18"]["peer"] == {"img_per_s": 1.0}
    assert "| broken | resnet18 |" in (tmp_path / "bench_gpu.md").read_text()
    with pytest.raises(RuntimeError, match=r"no CUDA graph runner \(TypeError: capture\)"):
        bench.run_featcache("gpu-graphs", None, None, None, tmp_path / "graphs.h5", None, graphed="TypeError: capture")


def test_bench_decode_host_times_both_kinds(monkeypatch):
    """The stand-in decoder's batches go through decode_items: every row on the "device", none rejected."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_decode_host")
    assert all(bench.host_rate(kind, batch_size=16, batches=2) > 0 for kind in bench.KINDS)
    batch, _ = bench.make_batch("mixed", 64)
    assert len(set(batch.sizes)) > 40  # about one size group per image


def test_bench_gpu_without_a_dask_cluster_fails_only_the_dask_case(monkeypatch):
    import contextlib

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench_gpu = importlib.import_module("bench_gpu")

    def refuse(**kwargs):
        raise OSError("no free port")

    monkeypatch.setattr(bench_gpu, "LocalCluster", refuse)
    with contextlib.ExitStack() as stack:
        client = bench_gpu.start_cluster(2, stack)
    assert client == "OSError: no free port"
    with pytest.raises(RuntimeError, match=r"no dask cluster \(OSError: no free port\)"):
        bench_gpu.run_dask("resnet18", None, None, None, client, None)


def test_bench_cpu_runtimes_smoke_measures_every_runtime(tmp_path):
    """Every runtime runs end to end and is compared with onnxruntime's float32 store (tiny resnet18).

    In a child process, as the script is run: it sets process-wide state (torch's threads, glibc's malloc
    tuning, four runtimes' thread pools) that must not leak into the rest of the suite.
    """
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_cpu_runtimes.py"), "--smoke", "--threads", "1",
                           "--fp16", "--int8", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "bench_cpu_runtimes.json").read_text())
    rows = results["backbones"]["resnet18"]["runtimes"]
    assert list(rows) == ["onnxruntime f32", "openvino f32", "openvino bf16", "torch bf16", "openvino fp16",
                          "onnxruntime int8"]
    assert rows["onnxruntime f32"]["e2e_ratio"] == 1.0 and rows["onnxruntime f32"]["cosine_min"] > 0.9999
    assert rows["openvino f32"]["cosine_min"] > 0.9999  # the same graph, the same store
    assert all(row["forward"] > 0 and row["e2e"] > 0 and row["cosine_min"] > 0.99 for row in rows.values())
    assert "| resnet18 (pool5) | openvino bf16 |" in (tmp_path / "bench_cpu_runtimes.md").read_text()


def test_bench_scaler_compares_both_scalers_on_a_store(tmp_path):
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    store = tmp_path / "tiny.h5"
    with h5py.File(store, "w") as f:
        label = np.tile(np.arange(3), 30)
        f["split"], f["label"] = np.repeat(np.arange(3, dtype=np.uint8), 30), label
        f["features/pool"] = (rng.normal(size=(90, 6)) + label[:, None]).astype(np.float16)
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_scaler.py"), "--store", str(store), "--tasks",
                           "classification"], capture_output=True, text=True, timeout=300, check=True)
    rows = [line for line in done.stdout.splitlines() if line.startswith("| classification | pool |")]
    assert [row.split(" | ")[4] for row in rows] == ["plain", "clipped", "plain", "clipped"]


def test_bench_mlp_small_variants_and_table(monkeypatch, tmp_path):
    import h5py
    import numpy as np

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_mlp_small")
    # `epochs`: the loop before min_epoch_steps (plain epochs); `shipped`: the head's default; `batch4`: ~4 steps/epoch
    assert bench.variant_params("epochs", 50) == {**bench.SHIPPED, "min_epoch_steps": 1}
    assert bench.variant_params("shipped", 50) == bench.SHIPPED
    assert bench.variant_params("batch4", 200) == {**bench.SHIPPED, "min_epoch_steps": 1, "batch_size": 50}
    rng = np.random.default_rng(0)
    store = tmp_path / "tiny.h5"
    with h5py.File(store, "w") as f:
        f["split"] = np.repeat(np.arange(3, dtype=np.uint8), [20, 8, 8])
        f["target"] = rng.normal(10, 3, 36)
        f["features/pool"] = np.abs(rng.normal(size=(36, 12))).astype(np.float16)
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_mlp_small.py"), "--n-train", "30", "--datasets",
                           "friedman1", "--seeds", "0", "--store", str(store), "--layers", "pool"],
                          capture_output=True, text=True, timeout=300, check=True)
    rows = [line.split(" | ") for line in done.stdout.splitlines() if line.startswith(("| friedman1 |", "| store:"))]
    assert [(r[0], r[1], r[2]) for r in rows] == [("| friedman1", "30", "1"), ("| store:pool", "20", "1")]
    assert all(float(cell) > 0 for r in rows for cell in r[3:10])  # the baseline, 3 MLPs, 3 ratios


def test_bench_csv_prepare_measures_a_clean_process():
    done = subprocess.run([sys.executable, str(BENCHMARKS / "bench_csv_prepare.py"), "--rows", "500", "--repeats", "1"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.startswith("| 500 rows | ") and "MiB above the imports" in done.stdout


def test_bench_ft_modes_subsample_keeps_val_and_test(tmp_path, monkeypatch):
    """``--train-per-class``: N train rows per class, every val/test row, absolute paths, the class list copied."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_ft_modes")
    lines = ["id,path,split,label,target"]
    lines += [f"{c}{i},img/{c}{i}.png,{s},{c}," for c in "ab" for i, s in enumerate(["train"] * 5 + ["val", "test"])]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "m" / "manifest.classes.json").write_text('{"classes": ["a", "b"]}\n')
    out = bench.subsample(tmp_path / "m" / "manifest.csv", 2, tmp_path / "out")
    rows = out.read_text().splitlines()[1:]
    splits = [r.split(",")[2] for r in rows]
    assert splits.count("train") == 4 and splits.count("val") == 2 and splits.count("test") == 2
    assert all(Path(r.split(",")[1]).is_absolute() for r in rows)
    assert (tmp_path / "out" / "manifest.classes.json").is_file()


def test_bench_imbalance_keeps_a_fraction_of_the_minority_and_every_other_row(tmp_path, monkeypatch):
    """``imbalanced_rows``: each minority class keeps ``fraction`` (at least 2) of its rows, the others all;
    ``head_params`` reads params.yaml's section with one thread."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_imbalance")
    labels = np.repeat(np.arange(4), [40, 40, 40, 5])
    rows = bench.imbalanced_rows(labels, [2, 3], 0.1, seed=0)
    assert np.bincount(labels[rows]).tolist() == [40, 40, 4, 2]
    assert np.array_equal(rows, np.sort(rows)) and len(set(rows.tolist())) == rows.size
    assert not np.array_equal(rows, bench.imbalanced_rows(labels, [2, 3], 0.1, seed=1))
    (tmp_path / "params.yaml").write_text("heads:\n  lightgbm: {num_leaves: 7, n_jobs: 4}\n")
    assert bench.head_params(tmp_path / "params.yaml", "lightgbm") == {"num_leaves": 7, "n_jobs": 1}
    assert bench.head_params(tmp_path / "params.yaml", "mlp") == {}


def test_bench_serve_times_both_paths_alternately_and_finds_run_folders(monkeypatch, tmp_path):
    """bench_serve's like-for-like timing: a warm-up of each path, then A B A B rounds over the same images; its run
    folder search finds every folder holding head.json (a run folder named itself, or under a models folder)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_serve")
    calls = []
    cases = {"a": lambda x: calls.append(("a", len(x))), "b": lambda x: calls.append(("b", len(x)))}
    result = bench.timings(cases, np.zeros((6, 3, 2, 2), np.float32), batch_size=4, latency_images=2, repeats=2)
    assert calls[:4] == [("a", 4), ("a", 1), ("b", 4), ("b", 1)]  # warm-up
    rounds = [name for name, _ in calls[4:]]
    assert rounds == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4  # 2 single images + 2 batches (4 + 2), alternating
    assert set(result) == {"a", "b"} and all(r["ms"] > 0 and r["img_s"] > 0 for r in result.values())
    for run in ("m/b/pool/logreg", "m/b/block6/mlp"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "head.json").write_text("{}")
    assert bench.run_folders([tmp_path / "m"]) == [tmp_path / "m/b/block6/mlp", tmp_path / "m/b/pool/logreg"]
    assert bench.run_folders([tmp_path / "m/b/pool/logreg"]) == [tmp_path / "m/b/pool/logreg"]
