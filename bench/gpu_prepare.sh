#!/usr/bin/env bash
# Run here, with network, before bench/gpu.sh goes to a GPU machine that has none: fills .gpu/
# (git-ignored; carry it with the run) with the wheels of what the GPU machine's image lacks for
# Python 3.12 (it has torch with CUDA, triton, transformers, numpy, pytest with xdist and timeout,
# tensorboard, PyYAML and pillow) and a small corpus, so the machine need not build one from
# packages it lacks. About 42 MiB, rdkit 32 of them.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/wheels
python3 -m pip download -q -d .gpu/wheels --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform any --no-deps rdkit hydra-core "omegaconf<2.4" torchao "megatron-core>=0.16,<0.17"
# hydra-core's parser runtime is published as a source archive only: build its (pure Python) wheel
# here, since an offline machine cannot fetch the build tools a source install needs
python3 -m pip wheel -q -w .gpu/wheels --no-deps "antlr4-python3-runtime==4.9.3"
python3 -c "from scifm.data.corpus import build_corpus; build_corpus('.gpu/corpus', max_docs_per_source=150)"
du -sh .gpu
