#!/usr/bin/env bash
# The device check in one call, on a GPU machine with torch but no network:
#   bash tools/gpu_check.sh WHEELHOUSE OUT_DIR [gpu_check.py options]
# installs the offline bundle (`make wheelhouse`) beside the machine's own torch, then runs
# tools/gpu_check.py, and packs its logs into OUT_DIR/logs.tar.gz.
set -uo pipefail
wheelhouse=$1 out=$2
shift 2
cd "$(dirname "$0")/.."
site=$(mktemp -d)
# --no-deps into a folder of its own: the bundle holds exactly what the machine lacks, and the
# machine's torch, numpy and CUDA libraries stay as they are. The checkout is llmscale itself.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
  $(ls "$wheelhouse"/*.whl | grep -v '/llmscale-') || exit 1
export PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm,temperature.gpu --format=csv
work=$(mktemp -d)
python3 tools/gpu_check.py "$work" "$@"
status=$?
mkdir -p "$out"
cp "$work"/summary.json "$work"/bench.csv "$work"/bench.png "$out"/ 2>/dev/null
tar -czf "$out/logs.tar.gz" -C "$work" --exclude=runs .
exit $status
