#!/usr/bin/env bash
# One call on a lent H100/H200 machine: the GPU-marked tests, benchmarks/profile_gpu.py (stages alone and a
# torch.profiler trace), then benchmarks/bench_gpu.py (interleaved end-to-end cases); results under $OUT.
# Here, first: `bash ../shared/gpu/make_wheels.sh 'dask==2026.8.0' 'torchcodec==0.17.*'` (wheels the machine lacks,
# into the git-excluded .whl/; the pins keep dask within distributed 2026.8's bound and TorchCodec built for the
# machine's torch 2.11: unpinned, the script fetches a newer dask, and a TorchCodec for a newer torch would not load).
# Then, with the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=590).
# Each step has its own time limit, so the call ends inside the tool's 10 minutes whatever happens.
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
# At most 8 files come back from $OUT: one log for everything printed, then the scripts' results
# (profile_gpu .json .md _ops.txt and two traces, bench_gpu .json .md).
exec > >(tee "$OUT/gpu_check.log") 2>&1
site=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl || exit 1
export PYTHONPATH=$site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, timm, onnxruntime; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'timm', timm.__version__, 'onnxruntime', onnxruntime.__version__)"
# Only the files that hold GPU-marked tests: collecting the whole suite would import tools the machine lacks.
# pytest-timeout is installed there: one hanging test cannot take the whole step.
timeout 150 python3 -m pytest -v -p no:cacheprovider -o addopts="" -m gpu -rs --durations=10 --timeout 60 \
  tests/extract/decode/test_device.py tests/extract/decode/test_real_photos.py tests/extract/test_engine.py \
  tests/extract/runners/test_graphs.py tests/finetune/test_finetune.py
echo "== profile"
timeout "${PROFILE_TIMEOUT:-140}" python3 benchmarks/profile_gpu.py --out "$OUT"
echo "== benchmark"
# --budget: fewer rounds rather than a second backbone cut off by the timeout (start-up and imports take the rest)
bench_timeout=${BENCH_TIMEOUT:-270}
timeout "$bench_timeout" python3 benchmarks/bench_gpu.py --out "$OUT" --budget $((bench_timeout - 30)) "$@"
ls -la "$OUT"
sleep 2  # let tee write the end of the log before the call collects $OUT
