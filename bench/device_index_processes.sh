#!/usr/bin/env bash
# bench_index_processes.py on the lent 16-core device (no network, a Python 3.12 without this
# project's dependencies): the index writers of N processes alone, with SQLite's busy handler
# against the process lock, over the disk and over tmpfs. Run from the repository root with
# .whl/ carried (filled by bench/prepare_device_reception.sh):
#
#   bash bench/device_index_processes.sh
#
# Environment: PYTHON (default /opt/torch/.venv/bin/python3), INDEX_ARGS (default
# "--runs 3 --rows 3000 --processes 1,2,4,8"), SKIP_WHEELS=1. Results: $OUT/index.log.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
out=${OUT:-/tmp/device-index-out}
python=${PYTHON:-/opt/torch/.venv/bin/python3}
args=${INDEX_ARGS:---runs 3 --rows 3000 --processes 1,2,4,8}
mkdir -p "$out"
exec > >(tee -a "$out/index.log") 2>&1
if [ "${SKIP_WHEELS:-0}" != 1 ]; then  # 1: the Python's own packages (a local check)
    ls .whl/*.whl >/dev/null || { echo "no .whl/: run bench/prepare_device_reception.sh"; exit 1; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$repo"
echo "cpus: $(nproc); $("$python" --version); $(df -h /tmp | tail -1)"
for dir in /tmp /dev/shm; do
    echo "== database in $dir"
    # shellcheck disable=SC2086
    PYTHONUNBUFFERED=1 "$python" bench/bench_index_processes.py $args \
        --variants busy-handler,process-lock --dir "$dir" || exit 1
done
