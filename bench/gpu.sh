#!/usr/bin/env bash
# The GPU check in one call, on a single-GPU machine without network (Python 3.12, a CUDA torch,
# triton, transformers). First run bench/gpu_prepare.sh where there is network and carry .gpu/.
# Runs the gpu-marked tests (FP8, bf16, NCCL; Megatron-Core's logits against scifm's, engine=megatron's
# training against the native engine's), then bench/gpu_step.py (bf16 against FP8, and attention over
# query blocks against one call, on a Qwen3-30B-A3B-shaped model cut to 6 layers); everything lands
# in $OUT (default gpu_out/). About 6 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
{ python -m pip install -q --no-index --find-links .gpu/wheels rdkit hydra-core omegaconf torchao pytest pytest-xdist \
    pytest-timeout megatron-core &&
  # TensorBoard's event files need only these; its server's dependencies (grpcio, werkzeug, ...) stay behind
  python -m pip install -q --no-index --find-links .gpu/wheels --no-deps tensorboard protobuf absl-py
} > "$OUT/pip.txt" 2>&1 || { tail -5 "$OUT/pip.txt"; exit 1; }
export PYTHONPATH="$PWD" SCIFM_TEST_CORPUS="$PWD/.gpu/corpus" SCIFM_CACHE="$PWD/.gpu/cache"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 300 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_megatron.py tests/test_megatron_engine.py 2>&1 | tail -30 | tee "$OUT/pytest_gpu.txt"
timeout 300 python bench/gpu_step.py --out "$OUT/gpu_step.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/gpu_step.txt"
