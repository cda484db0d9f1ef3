#!/usr/bin/env bash
# bench_reception.py with listener processes 1,2,4,8 on a bigger machine that has no network,
# no dcmtk, no Orthanc and a Python 3.12 without this project's dependencies (the lent
# 16-core device). Run from the repository root, after bench/prepare_device_reception.sh
# filled .debs/ and .whl/ (both carried along):
#
#   bash bench/device_reception.sh
#
# - .debs/*.deb (Debian 12: dcmtk, orthanc, their libraries, glibc) are unpacked with
#   dpkg -x into a private prefix ($PREFIX, never /). storescp, storescu and Orthanc run from
#   it through wrappers in $PREFIX/bin, first on PATH, that start each program with the
#   prefix's own loader and library path (ld.so --library-path, the loader's form of
#   LD_LIBRARY_PATH): the device's C library and libraries are never mixed with Debian's, and
#   the library path never leaks into Python.
# - .whl/*.whl are installed with pip --no-index --no-deps into /tmp/site (PYTHONPATH).
# Results go under $OUT (bench.log, reception.json, machine.txt); the benchmark prints per
# listener process count its img/s, ratios to storescp and Orthanc in the same run and
# whether it was above Orthanc in every run.
#
# Environment: PYTHON (default /opt/torch/.venv/bin/python3), BENCH_ARGS (default
# "--instances 500 --runs 5 --processes 1,2,4,8 --no-plain --max-seconds 330"), BENCH_TIMEOUT_S (default 480),
# SRC (where .debs/ and .whl/ are; default the repository root), SKIP_WHEELS=1 (use the
# Python's own packages: for a local check of the prefix on the machine that prepared it).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
src=${SRC:-$repo}
out=${OUT:-/tmp/device-reception-out}
prefix=${PREFIX:-/tmp/dcmtk-orthanc}
python=${PYTHON:-/opt/torch/.venv/bin/python3}
args=${BENCH_ARGS:---instances 500 --runs 5 --processes 1,2,4,8 --no-plain --max-seconds 330}
mkdir -p "$out"
exec > >(tee -a "$out/bench.log") 2>&1

# --- dcmtk and Orthanc from a private prefix --------------------------------------------
ls "$src"/.debs/*.deb >/dev/null || { echo "no .debs/: run bench/prepare_device_reception.sh"; exit 1; }
rm -rf "$prefix" && mkdir -p "$prefix/bin"
for deb in "$src"/.debs/*.deb; do dpkg -x "$deb" "$prefix" || exit 1; done
loader=$(find "$prefix" -name 'ld-linux-x86-64.so.2' -type f | head -1)
[ -n "$loader" ] || { echo "no loader in the prefix (libc6 missing from .debs/)"; exit 1; }
libpath="$prefix/lib/x86_64-linux-gnu:$prefix/usr/lib/x86_64-linux-gnu"
make_wrapper() {  # name, program inside the prefix
    cat >"$prefix/bin/$1" <<EOF
#!/bin/sh
DCMDICTPATH="$prefix/usr/share/libdcmtk17/dicom.dic" GCONV_PATH="$prefix/usr/lib/x86_64-linux-gnu/gconv" \\
exec "$loader" --library-path "$libpath" --argv0 "$1" "$prefix$2" "\$@"
EOF
    chmod +x "$prefix/bin/$1"
}
make_wrapper storescp /usr/bin/storescp
make_wrapper storescu /usr/bin/storescu
make_wrapper echoscu /usr/bin/echoscu
make_wrapper Orthanc /usr/sbin/Orthanc
export PATH="$prefix/bin:$PATH"
# sed reads to the end: head would close the pipe early and fail the program (SIGPIPE)
storescp --version | sed -n 1p || exit 1
Orthanc --version | sed -n 1p || exit 1

# --- Python packages ----------------------------------------------------------------------
if [ "${SKIP_WHEELS:-0}" != 1 ]; then
    ls "$src"/.whl/*.whl >/dev/null || { echo "no .whl/: run bench/prepare_device_reception.sh"; exit 1; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$src"/.whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$repo"
else
    export PYTHONPATH="$repo"
fi
"$python" -c "import pacs_agent.service, pacs_agent.listeners, pynetdicom, sqlalchemy, celery" || exit 1

{
    date -u
    uname -a
    echo "cpus: $(nproc)"
    grep -m1 'model name' /proc/cpuinfo
    free -g | head -2
    df -h /tmp | tail -1
    "$python" --version
    storescp --version | sed -n 1p
    Orthanc --version | sed -n 1p
    git -C "$repo" rev-parse HEAD 2>/dev/null || true
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

# --- the benchmark ---------------------------------------------------------------------------
# shellcheck disable=SC2086
PYTHONUNBUFFERED=1 timeout "${BENCH_TIMEOUT_S:-480}" "$python" bench/bench_reception.py \
    $args --json "$out/reception.json"
code=$?
echo "bench_reception.py exit status $code"
exit $code
