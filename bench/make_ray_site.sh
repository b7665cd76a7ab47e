#!/usr/bin/env bash
# Build .whl/ray.tar.xz: Ray (the pin in requirements-dev.txt) and the small packages it needs that the offline GPU
# image lacks, unpacked from their wheels, trimmed of what a batch never imports, and packed with xz, to be shipped
# with the checkout beside ../shared/gpu/make_site.sh's .whl/site.tar.xz (the GPU machine receives 64 MiB in all;
# Ray's wheel alone is 79 MB). Run here (where pip reaches PyPI), from the repo root:
#   bash bench/make_ray_site.sh            # cp312, for the GPU machine's Python 3.12
#   PY=3.11 bash bench/make_ray_site.sh    # cp311, to try the trimmed Ray on this machine's Python
# On the GPU machine: mkdir -p /tmp/site && tar xJf .whl/ray.tar.xz -C /tmp/site (with PYTHONPATH=/tmp/site:$PWD).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=${PY:-3.12}
OUT=${OUT:-.whl/ray.tar.xz}
EXCLUDE=$(git rev-parse --git-path info/exclude)  # .git is a file in a worktree: ask git where the file is
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || echo /.whl/ >> "$EXCLUDE"
RAY=$(grep -E '^ray==' requirements-dev.txt)
# Ray's own requirements that the image may lack: msgpack, click and protobuf. It has filelock, packaging, PyYAML and
# requests (datasets needs them, and ran there with site.tar.xz, which brings jsonschema); Ray bundles psutil.
PKGS="$RAY msgpack==1.2.4 click==8.5.1 protobuf==7.36.2"
W=$(mktemp -d)
S=$(mktemp -d)
trap 'rm -rf "$W" "$S"' EXIT
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$W" $PKGS
for f in "$W"/*.whl; do unzip -q -o "$f" -d "$S"; done
R=$S/ray
# Never imported by a batch: Java (jars), the dashboard's built web client, Ray's libraries above its core tasks
# (RLlib, Serve, Data, Train, Tune, AIR, LLM, workflows), the C++ API headers and the bundled tests. ray.widgets
# stays: ray.init imports it.
rm -rf "$R/jars" "$R/dashboard/client/build" "$R/rllib" "$R/serve" "$R/data" "$R/train" "$R/tune" "$R/air" \
       "$R/llm" "$R/workflow" "$R/cpp" "$R/tests"
find "$S" -name '__pycache__' -type d -prune -exec rm -rf {} +
# Debug symbols: the core's executables and libraries run the same without them.
find "$R" -type f \( -name '*.so' -o -path '*/core/src/ray/*' \) -exec sh -c \
  'file -b "$1" | grep -q ELF && strip --strip-unneeded "$1"' _ {} \;
mkdir -p "$(dirname "$OUT")"
(cd "$S" && tar cf - . | xz -9e -T0) > "$OUT"
echo "$RAY for Python $PY: wheel $(du -b "$W"/ray-*.whl | cut -f1) bytes, unpacked and trimmed $(du -sb "$S" | cut -f1)" \
     "bytes, packed $(du -b "$OUT" | cut -f1) bytes in $OUT"
