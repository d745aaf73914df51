#!/usr/bin/env bash
# The GPU check in one call, on a single-GPU machine without network (Python 3.12, a CUDA torch,
# triton, transformers, pytest). First run bench/gpu_prepare.sh where there is network and carry .gpu/.
# Runs bench/gpu_step.py first (bf16 against FP8, attention over query blocks against one call, and
# compiled blocks, on a Qwen3-30B-A3B-shaped model cut to 6 layers), then the gpu-marked tests (FP8,
# bf16, NCCL; Megatron-Core's logits against scifm's, engine=megatron's training against the native
# engine's); everything lands in $OUT (default gpu_out/). Each part has its own time limit, so the
# whole ends within 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# only what the machine lacks, without resolving: its own torch, numpy, pytest, tensorboard stay as they are
python3 -m pip install -q --no-index --no-deps --no-compile .gpu/wheels/{rdkit,hydra_core,omegaconf,antlr4_python3_runtime,torchao,megatron_core}-*.whl \
  > "$OUT/pip.txt" 2>&1 || tail -5 "$OUT/pip.txt"
export PYTHONPATH="$PWD" SCIFM_TEST_CORPUS="$PWD/.gpu/corpus" SCIFM_CACHE="$PWD/.gpu/cache"
python3 -c "import torch, triton, transformers, torchao, rdkit, hydra, megatron.core, pytest, xdist, pytest_timeout
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'torchao', torchao.__version__, 'pytest', pytest.__version__)" 2>&1 | tail -3 | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 280 python3 bench/gpu_step.py --out "$OUT/gpu_step.json" --budget-s 200 2>&1 | grep -v "^W[0-9]" | tee "$OUT/gpu_step.txt"
timeout 220 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 150 --tb=short -rfEs \
  tests/test_gpu.py tests/test_megatron.py tests/test_megatron_engine.py 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -60
