#!/usr/bin/env bash
# The checks and benchmarks that need a CUDA GPU, as one script for a lent GPU machine with torch and
# transformers installed (run from the repository root; results go to $OUT, or /tmp/gpu-checks):
#   tests/test_fast_kernels.py               capture under flash / memory-efficient / cuDNN / math against HF eager
#   bench_long_context.py           long inputs on the GPU (bfloat16 model), each mode in its own process
#   bench_capture.py                the cost of capture on MiniLM's architecture (random weights) on the GPU: the
#                                   default device ("auto", kept on the GPU) and full_fp32_to_cpu (pinned copies)
#   bench_host_copy.py              GPU -> CPU copy bandwidth: pageable copy_ against the pinned, double-buffered copies
# Each step has its own time limit, so that one stuck step leaves the others' results.
set -u
out=${OUT:-/tmp/gpu-checks}
mkdir -p "$out"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  2>&1 | tee -a "$out/gpu.txt"
timeout "${TEST_S:-170}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_fast_kernels.py 2>&1 | tee "$out/test_gpu.txt"
timeout "${LONG_S:-150}" python3 benchmarks/bench_long_context.py --device cuda --dtype bfloat16 --rounds 3 \
  --lengths 8192 32768 --modes plain hf_eager full_fp16 full_on_device full_auto head0 last_row stats pooled \
  2>&1 | tee "$out/long_context.txt"
timeout "${STREAM_S:-45}" python3 benchmarks/bench_long_context.py --device cuda --dtype bfloat16 --rounds 1 \
  --lengths 8192 --modes plain stream 2>&1 | tee "$out/long_context_stream.txt"
timeout "${CAPTURE_S:-75}" python3 benchmarks/bench_capture.py --device cuda --random-weights --rounds 10 \
  2>&1 | tee "$out/capture.txt"
timeout "${COPY_S:-35}" python3 benchmarks/bench_host_copy.py --sizes-mib 64 1024 --rounds 3 \
  2>&1 | tee "$out/host_copy.txt"
