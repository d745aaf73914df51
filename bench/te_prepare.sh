#!/usr/bin/env bash
# Run here, with network, before Transformer Engine goes to the GPU machine, which has none and
# takes at most 64 MiB a call: fills .te1/ .. .te5/ (git-ignored), one folder per device call.
# Transformer Engine 2.20.2 for CUDA 13 and Python 3.12: the core library's wheel (264 MiB) split
# into parts of 60 MiB; the torch extension's source (0.5 MiB, C++ only, built there against the
# machine's CUDA torch); and the small wheels of what the machine's image lacks.
# bench/te_gpu.sh says how to send them, and builds and tests there.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=2.20.2
rm -rf .te .te1 .te2 .te3 .te4 .te5 && mkdir -p .te
pip_download() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .te "$@"
}
pip_download "transformer-engine-cu13==$VERSION" "transformer-engine==$VERSION" nvidia-cudnn-frontend \
  nvdlfw-inspect pydantic pydantic-core annotated-types typing-inspection
# the extension is published as source only; pip would build it to read its metadata, so fetch the file
python3 - "$VERSION" <<'PY'
import json, sys, urllib.parse, urllib.request
index = "https://pypi.org/pypi/transformer-engine-torch/json"
release = json.load(urllib.request.urlopen(index))["releases"][sys.argv[1]]
sdist = next(f for f in release if f["packagetype"] == "sdist")
urllib.request.urlretrieve(urllib.parse.urljoin(index, sdist["url"]), f".te/{sdist['filename']}")
PY
core=$(ls .te/transformer_engine_cu13-*.whl)
split -b 60M -d "$core" .te/core.part.
basename "$core" > .te/core.name  # pip reads the platform tags from the wheel's file name
rm "$core"
i=0
for part in .te/core.part.*; do i=$((i + 1)); mkdir ".te$i"; mv "$part" ".te$i/"; done
[ "$i" -le 5 ] || { echo "te_prepare.sh: the core wheel needs $i parts; .gitignore and te_gpu.sh know 5" >&2; exit 1; }
mv .te/*.whl .te/*.tar.gz .te/core.name ".te$i/"  # the last part is the smallest
rmdir .te
du -sh .te?
