"""Where a local dask cluster's fixed cost goes, against the work, on the digits (shipped extract params).

Prints a markdown table for one run of each:

* **single process**: the extract stage (``featcache.pipeline.extract``) with
  ``extract_run.scheduler: none``, wall time from the call to the renamed store;
* **local cluster, by phase**: ``LocalCluster`` + ``Client`` start (2 worker
  processes x 1 thread); importing the worker code in every worker (measured
  inside each worker); building the runner in every worker (the ONNX export
  cache hit: ``RunnerSpec.build``, measured inside each worker); the
  extraction with warm workers (``extract_distributed``: probe, tasks,
  adopting blocks, assembly), with the workers' summed task seconds; closing
  the cluster;
* **local cluster, the stage**: the extract stage with ``extract_run.scheduler:
  local`` (cold workers: everything above in one call), and whether its md5
  equals the single-process store's.

Run from a folder holding ``params.yaml`` and the prepared digits
(``data/prepared/digits/manifest.csv``), e.g. the repository after ``dvc repro``::

    python benchmarks/bench_dask.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

BACKBONE = "efficientnet_lite0"
MANIFEST = "data/prepared/digits/manifest.csv"


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _import_worker_code() -> float:
    started = time.perf_counter()
    import featcache.extract.distributed  # noqa: F401 - what unpickling a task imports

    return time.perf_counter() - started


def _build_runner(spec, input_size: int, threads: int) -> tuple[float, bool]:
    import sys

    started = time.perf_counter()
    spec.build_with_attrs(input_size, threads)
    return time.perf_counter() - started, "torch" in sys.modules


class _TaskSeconds(logging.Handler):
    """Collects the per-task seconds the driver logs ("blocks (..) done on host:pid in S s")."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"done on .* in ([0-9.]+) s$", record.getMessage())
        if found:
            self.seconds.append(float(found.group(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from featcache.extract.decode.preprocess import Preprocessor
    from featcache.extract.distributed import THREADS_PER_WORKER, extract_distributed
    from featcache.extract.inputs.manifest import Manifest
    from featcache.extract.plan import plan_extraction
    from featcache.extract.runner_spec import RunnerSpec
    from featcache.extract.zoo.weights import resolve_weights
    from featcache.pipeline import extract, load_params
    from featcache.pipeline.extract import store_config

    params = load_params("params.yaml")
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-dask-") as tmp:
        out = Path(tmp)
        started = time.perf_counter()
        single = extract(params, BACKBONE, MANIFEST, out / "single.h5", progress=False)
        rows.append(("single process: extract stage, total", f"{time.perf_counter() - started:.1f}"))

        knobs, chosen = params.extract, params.backbones[BACKBONE]
        plan = plan_extraction(**{**knobs.plan_settings(), "scheduler": "local"})
        source = resolve_weights(BACKBONE, chosen.weights)
        preprocess = Preprocessor.from_spec(source.spec, knobs.resize_mode, max_image_pixels=knobs.max_image_pixels)
        spec = RunnerSpec.from_plan(plan, BACKBONE, chosen.weights, chosen.layers, knobs.pooling,
                                    channels_last=knobs.channels_last, onnx_cache=knobs.onnx_cache)
        config = store_config(params, BACKBONE, plan, preprocess, torch_threads=THREADS_PER_WORKER)
        attrs = {"backbone": BACKBONE, "weights_id": source.weights_id, "weights_sha256": source.weights_sha256,
                 "dataset": params.data.name, **plan.attrs()}

        started = time.perf_counter()
        cluster = LocalCluster(n_workers=2, threads_per_worker=THREADS_PER_WORKER, processes=True,
                               dashboard_address=":0")
        client = Client(cluster)
        rows.append(("local: LocalCluster + Client start (2 processes)", f"{time.perf_counter() - started:.1f}"))
        try:
            imports = client.run(_import_worker_code)
            rows.append(("local: import the worker code, per worker", ", ".join(f"{s:.1f}" for s in imports.values())))
            builds = client.run(_build_runner, spec, preprocess.input_size, THREADS_PER_WORKER)
            rows.append(("local: build the runner (ONNX cache hit), per worker",
                         ", ".join(f"{s:.2f}" for s, _ in builds.values())))
            rows.append(("local: torch imported by a worker", str(any(t for _, t in builds.values()))))
            collector = _TaskSeconds()
            logger = logging.getLogger("featcache.extract.distributed")
            logger.addHandler(collector)
            logger.setLevel(logging.DEBUG)
            started = time.perf_counter()
            extract_distributed(Manifest.read(MANIFEST), spec, preprocess, out / "warm.h5", config=config,
                                attrs=attrs, dtype=knobs.dtype, block_rows=knobs.block_rows,
                                batch_size=knobs.batch_size, client=client, progress=False)
            warm = time.perf_counter() - started
            logger.removeHandler(collector)
            rows.append(("local: extract_distributed with warm workers (probe, tasks, assembly)", f"{warm:.1f}"))
            rows.append((f"local: task seconds ({len(collector.seconds)} tasks; sum / longest)",
                         f"{sum(collector.seconds):.1f} / {max(collector.seconds):.1f}"))
        finally:
            started = time.perf_counter()
            client.close()
            cluster.close()
            rows.append(("local: close the cluster", f"{time.perf_counter() - started:.1f}"))

        params.extract.scheduler = "local"
        started = time.perf_counter()
        stage = extract(params, BACKBONE, MANIFEST, out / "local.h5", progress=False)
        rows.append(("local: extract stage, total (cold workers)", f"{time.perf_counter() - started:.1f}"))
        rows.append(("local stage md5 == single process md5", str(_md5(stage.path) == _md5(single.path))))
        rows.append(("warm-worker md5 == single process md5", str(_md5(out / "warm.h5") == _md5(single.path))))

    print(f"# digits ({params.data.name}), {BACKBONE}, load average {os.getloadavg()[0]:.1f}")
    print("| phase | seconds |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
