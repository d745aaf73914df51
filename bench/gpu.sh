#!/usr/bin/env bash
# The GPU check in one call, on a single-GPU machine without network (Python 3.12, a CUDA torch,
# triton, transformers, pytest). First run bench/gpu_prepare.sh where there is network and carry .gpu/.
# Runs, each part under its own time limit so that the whole ends within 10 minutes (about 8 on an
# H200; give the device call timeout_s=600), most wanted first:
# - bench/gpu_step.py at batch 2 x 4096 (compiled bf16 against compiled FP8 and against bf16 with
#   attention as one SDPA call; a Qwen3-30B-A3B-shaped model cut to 6 layers; one step of compiled
#   bf16 and of compiled FP8 profiled, by kernel);
# - the gpu-marked tests (FP8 training and grouped FP8 GEMMs, bf16, NCCL; Megatron-Core's logits
#   against scifm's, engine=megatron against the native engine);
# - bench/fp8_grouped_gemm.py (the experts' GEMMs piece by piece);
# - bench/gpu_step.py again at batch 8 x 4096 (the optimizer's fixed cost spread over 4x the tokens;
#   bf16, one SDPA call, FP8).
# Everything lands in $OUT (default gpu_out/): 7 files of the 8 a device call brings back.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# only what the machine lacks, without resolving: its own torch, numpy, pytest, tensorboard stay as they are
python3 -m pip install -q --no-index --no-deps --no-compile .gpu/wheels/{rdkit,hydra_core,omegaconf,antlr4_python3_runtime,torchao,megatron_core}-*.whl \
  > /tmp/pip.txt 2>&1 || tail -5 /tmp/pip.txt | tee "$OUT/versions.txt"
export PYTHONPATH="$PWD" SCIFM_TEST_CORPUS="$PWD/.gpu/corpus" SCIFM_CACHE="$PWD/.gpu/cache"
python3 -c "import torch, triton, transformers, torchao, rdkit, hydra, megatron.core, pytest, xdist, pytest_timeout
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__,
      'torchao', torchao.__version__, 'pytest', pytest.__version__)" 2>&1 | tail -3 | tee -a "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/versions.txt"
step() { grep -v "^W[0-9]\|Configuration class for applying" | tee -a "$OUT/gpu_step.txt"; }
timeout 150 python3 bench/gpu_step.py --out "$OUT/gpu_step.json" --budget-s 100 \
  --modes bf16_compiled,fp8_compiled,bf16_one_call_compiled \
  --profile-modes bf16_compiled,fp8_compiled --profile-dir "$OUT" 2>&1 | step
# the grouped FP8 GEMMs' errors against fp32 are printed (-s: one process, so the print shows)
{ timeout 40 python3 -m pytest -q -n 0 -s -m gpu -p no:cacheprovider --tb=short tests/test_fp8_grouped.py
  timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 150 --tb=short -rfEs \
    tests/test_gpu.py tests/test_megatron.py tests/test_megatron_engine.py
} 2>&1 | grep -v "Warning:\|warnings.warn" | tee "$OUT/pytest_gpu.txt" | tail -60  # the summary line stays
timeout 60 python3 bench/fp8_grouped_gemm.py --rounds 5 2>&1 | grep -v "^W[0-9]" | tee "$OUT/benches.txt"
timeout 150 python3 bench/gpu_step.py --out "$OUT/gpu_step_b8.json" --budget-s 90 --batch 8 --warmup 2 --steps 4 \
  --modes bf16_compiled,bf16_one_call_compiled,fp8_compiled 2>&1 | step
