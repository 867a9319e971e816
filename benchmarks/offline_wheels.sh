#!/usr/bin/env bash
# Downloads the wheels that benchmarks/gpu_suite.sh needs on an offline machine whose Python
# already has jax, flax, optax, orbax-checkpoint, torch, numpy, protobuf, etils, absl-py,
# requests, tqdm, psutil, pyarrow, wrapt and six: PyAV and ml_collections (every step), and
# tensorflow-datasets, grain and array_record with the dependencies those lack (the prepared-
# dataset step).
#
#   PY_VERSION=3.12 DEST=.whl bash benchmarks/offline_wheels.sh
#
# On the offline machine (installs them into /tmp/site, adding the carried protobuf only where
# the machine's own is too old for the carried generated code):
#   bash benchmarks/install_wheels.sh .whl /tmp/site && export PYTHONPATH=/tmp/site
set -euo pipefail
PY_VERSION=${PY_VERSION:-3.12}
DEST=${DEST:-.whl}
PIP=${PIP:-python3 -m pip}
mkdir -p "$DEST"
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
  manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
# Versions this repository's tests ran with (pyproject.toml's floors are lower).
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST" \
  av==18.1.0 ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 \
  tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 \
  dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0 \
  portpicker==1.6.0 termcolor==3.3.0 toml==0.10.2
# promise is published as a source archive only: build its (pure Python) wheel here.
$PIP wheel --quiet --no-deps -w "$DEST" promise==2.3
# tensorflow-metadata's and googleapis-common-protos' generated code refuses a protobuf runtime
# older than the protoc that wrote it (6.31.1 and 6.33.5): install_wheels.sh adds this one only
# where the machine's protobuf is older. Kept apart so that it never shadows a newer one.
mkdir -p "$DEST/protobuf"
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp "${PLATFORMS[@]}" -d "$DEST/protobuf" protobuf==6.33.5
ls -la "$DEST" "$DEST/protobuf"
