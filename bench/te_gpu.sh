#!/usr/bin/env bash
# Transformer Engine on the single-GPU machine (no network, 64 MiB a call; its image has a CUDA 13
# torch, nvcc, cmake, ninja and pybind11): installs what bench/te_prepare.sh put into .te1/ .. .te5/,
# builds the torch extension there against the machine's torch, and runs the gpu tests' te recipes
# (tests/test_gpu.py: FP8 training with each te recipe the GPU supports, final loss within 1% of bf16).
# A machine keeps git-ignored folders between calls while it stays warm (30 s after a call), so:
#   calls 1 to 5, back to back: `run` with carry [".teN"] and command `true`;
#   call 6, at once: carry [".gpu"] (bench/gpu_prepare.sh), command `OUT=$OUT bash bench/te_gpu.sh`,
#   timeout_s 600. Files back: te.txt (the steps' summary), te_build.txt, pytest_te.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-te_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
missing=$(for n in 1 2 3 4 5; do [ -d ".te$n" ] || echo -n ".te$n "; done)
if [ -n "$missing" ]; then
  echo "te_gpu.sh: not on this machine: $missing(each call carries one; the machine must stay warm between them)" | tee "$OUT/te.txt"
  exit 1
fi
last=$(dirname .te?/core.name)
core=/tmp/$(cat "$last/core.name")
cat .te?/core.part.* > "$core"  # the glob sorts .te1/core.part.00 first
python3 -m pip install -q --no-index --no-deps --no-compile "$core" "$last"/*.whl \
  .gpu/wheels/{rdkit,hydra_core,omegaconf,antlr4_python3_runtime,torchao,megatron_core}-*.whl 2>&1 | tail -5 | tee "$OUT/te.txt"
# the extension's setup.py first tries to download a prebuilt wheel: force the build
NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=16 timeout 360 python3 -m pip install --no-index --no-deps \
  --no-build-isolation -v "$last"/transformer_engine_torch-*.tar.gz > "$OUT/te_build.txt" 2>&1
echo "extension build: exit $?" | tee -a "$OUT/te.txt"
python3 -c "import transformer_engine.pytorch as te, transformer_engine; print('transformer_engine', transformer_engine.__version__)" \
  2>&1 | tail -3 | tee -a "$OUT/te.txt"
export PYTHONPATH="$PWD" SCIFM_TEST_CORPUS="$PWD/.gpu/corpus" SCIFM_CACHE="$PWD/.gpu/cache"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 150 --tb=short -rfEs tests/test_gpu.py \
  -k "fp8_training and (delayed or current or blockwise or mxfp8)" 2>&1 | grep -v "Warning:\|warnings.warn" \
  | tee "$OUT/pytest_te.txt" | tail -30
