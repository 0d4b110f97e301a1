"""Extraction memory: peak RSS stays flat in the number of images (features stream to disk).

Each measurement is a clean process started through ``/bin/sh`` (fork of a small
shell, then exec): Linux carries the pre-``execve`` high-water mark into
``ru_maxrss``, so a child exec'ed straight from pytest (torch loaded) would report
pytest's peak. The child's ``VmHWM`` must agree with ``ru_maxrss``.

The features are made large on purpose (resnet18 ``res2``, 64 x 56 x 56 per image,
unpooled float32: 0.77 MiB per image), so holding the rows of 4N images instead of
N would add tens of MiB; the contrast run does exactly that and must break the bound.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import featcache

N = 24
PER_IMAGE = 64 * 56 * 56 * 4  # bytes of one row of unpooled float32 res2 features

_CHILD = r"""
import resource, sys, tempfile
from pathlib import Path
import numpy as np
from PIL import Image
import torch
torch.set_num_threads(1)
from featcache.extract.engine import extract_to_store
from featcache.extract.inputs.manifest import Manifest, assign_splits
from featcache.extract.decode.preprocess import Preprocessor
from featcache.extract.runners.torch_runner import TorchFeatureExtractor
from featcache.extract.zoo.weights import load_backbone
from featcache.extract.plan import plan_extraction

#: One process decodes (the default loader of a runner on the CPU).
CPU_PLAN = plan_extraction(device="cpu", backend="torch", num_workers=0)

n, hold = int(sys.argv[1]), sys.argv[2] == "hold"
loaded = load_backbone("resnet18", "random")
runner = TorchFeatureExtractor(loaded.model, loaded.spec, ["res2"], pooling="none", channels_last=False)
if hold:  # the deliberately broken variant: every batch's features stay in memory
    kept, inner = [], runner
    class Holding:
        def __getattr__(self, name):
            return getattr(inner, name)
        def __call__(self, batch):
            out = inner(batch)
            kept.append({k: np.array(v, copy=True) for k, v in out.items()})
            return out
    runner = Holding()
with tempfile.TemporaryDirectory() as tmp:
    root = Path(tmp)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i:04d}.png")
        names.append(f"{i:04d}.png")
    labels = np.arange(n) % 2
    manifest = Manifest(names, names, assign_splits(names, {"train": 0.5, "val": 0.25, "test": 0.25}, 0, strata=labels),
                        "classification", labels=labels, classes=["a", "b"], root=root)
    extract_to_store(manifest, runner, Preprocessor.from_spec(loaded.spec), root / "f.h5", config={"n": n},
                     dtype="float32", batch_size=8, plan=CPU_PLAN, block_rows=8, progress=False)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm)
"""


def peak_rss_kib(n: int, hold: bool = False) -> int:
    """Peak RSS (KiB) of a clean process extracting ``n`` generated images."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src = str(Path(featcache.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    out = subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", _CHILD, str(n),
                          "hold" if hold else "stream"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    rss, hwm = (int(v) for v in out.stdout.split()[-2:])
    assert abs(rss - hwm) <= 0.05 * hwm, f"ru_maxrss {rss} KiB != VmHWM {hwm} KiB: an inherited high-water mark?"
    return rss


@pytest.mark.slow
def test_extraction_peak_rss_is_flat_in_the_number_of_images():
    rss_n, rss_4n = peak_rss_kib(N), peak_rss_kib(4 * N)
    extra = 3 * N * PER_IMAGE / 1024  # KiB the 3N extra rows would take if they were held
    assert rss_4n - rss_n < 0.4 * extra, (rss_n, rss_4n, extra)
    assert rss_4n < 1.1 * rss_n, (rss_n, rss_4n)
    # contrast: the same extraction holding every row breaks the bound
    rss_held = peak_rss_kib(4 * N, hold=True)
    assert rss_held - rss_n > 0.4 * extra, (rss_n, rss_held, extra)
