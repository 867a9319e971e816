#!/usr/bin/env bash
# Installs the wheels that benchmarks/offline_wheels.sh fetched, on the offline GPU machine,
# into a folder of their own that goes first on PYTHONPATH:
#
#   bash benchmarks/install_wheels.sh .whl /tmp/site && export PYTHONPATH=/tmp/site
#
# The carried tensorflow-metadata and googleapis-common-protos hold protoc-generated code that
# refuses a protobuf runtime older than the protoc that wrote it. The machine's own protobuf is
# kept where it is new enough (a newer runtime reads older generated code); otherwise the
# carried protobuf (SRC/protobuf/) is installed beside the other wheels and shadows it.
set -euo pipefail
SRC=${1:-.whl}
TARGET=${2:-/tmp/site}
PY=${PYTHON:-python3}
install() {
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$TARGET" "$@"
}
install "$SRC"/*.whl
shopt -s nullglob
carried=("$SRC"/protobuf/protobuf-*.whl)
[ ${#carried[@]} -eq 1 ] || exit 0
# The machine's protobuf, read without TARGET on the path, against the carried wheel's version.
if ! PYTHONPATH= $PY - "${carried[0]}" <<'PYEOF'
import re
import sys

wheel = re.match(r"protobuf-(\d+)\.(\d+)\.(\d+)-", sys.argv[1].rsplit("/", 1)[-1])
try:
    from google.protobuf import __version__ as have
except ImportError:
    sys.exit(1)
have_parts = tuple(int(p) for p in re.findall(r"\d+", have)[:3])
need_parts = tuple(int(p) for p in wheel.groups())
print(f"protobuf {have} on the machine; the carried wheels need {'.'.join(wheel.groups())}")
sys.exit(0 if have_parts >= need_parts else 1)
PYEOF
then
  echo "installing the carried ${carried[0]##*/} into $TARGET"
  install "${carried[0]}"
fi
