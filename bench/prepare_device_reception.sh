#!/usr/bin/env bash
# Fills .debs/ and .whl/ for bench/device_reception.sh: a machine with no network, no dcmtk,
# no Orthanc and a Python 3.12 without this project's dependencies.
#
#   bash bench/prepare_device_reception.sh          # into the repository root
#   DEST=/tmp/x bash bench/prepare_device_reception.sh
#
# .debs/: the Debian 12 packages of dcmtk and Orthanc and of every shared library their
#   programs (storescp, storescu, Orthanc) load, found with ldd on this machine (where they are
#   installed: deploy/install-system-deps.sh) and mapped to packages with dpkg -S, glibc
#   included: device_reception.sh unpacks them with dpkg -x into a private prefix and runs the
#   programs through the prefix's own loader, whatever the device's C library is.
# .whl/: cp312 manylinux (or pure-Python) wheels of what `pacs-agent serve --no-worker`, the
#   listener processes and the benchmark import, at the versions of requirements.lock; the
#   device's Python already has numpy, click's neighbours and the like.
# Both folders are kept out of git (.git/info/exclude). Prints their sizes: whatever travels
# to the device (the working tree with both) must stay well under 64 MiB.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${DEST:-$repo}
python=${PYTHON:-python3}

if [ "$dest" = "$repo" ]; then
    exclude="$(git -C "$repo" rev-parse --git-common-dir)/info/exclude"
    mkdir -p "$(dirname "$exclude")"
    for p in /.debs/ /.whl/; do
        grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"
    done
fi

# --- Debian packages -------------------------------------------------------------------
programs=(/usr/bin/storescp /usr/bin/storescu /usr/sbin/Orthanc)
for p in "${programs[@]}"; do
    [ -x "$p" ] || { echo "$p missing: apt-get install dcmtk orthanc" >&2; exit 1; }
done
libs=$(ldd "${programs[@]}" | awk '/=>/ {print $3} /ld-linux/ {print $1}' | grep '^/' | sort -u)
packages="dcmtk orthanc libdcmtk17"
for lib in $libs; do
    real=$(readlink -f "$lib")
    owner=""
    for candidate in "$lib" "$real" "${real/#\/usr\/lib/\/lib}" "${lib/#\/lib/\/usr\/lib}"; do
        owner=$(dpkg -S "$candidate" 2>/dev/null | head -1 | cut -d: -f1) && [ -n "$owner" ] && break
    done
    [ -n "$owner" ] || { echo "no package owns $lib" >&2; exit 1; }
    packages="$packages $owner"
done
packages=$(echo "$packages" | tr ' ' '\n' | sort -u)
rm -rf "$dest/.debs" && mkdir -p "$dest/.debs"
# apt-get download writes into the current directory; as root it warns that _apt cannot
# write there (harmless).
(cd "$dest/.debs" && apt-get download $packages 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
count=$(ls "$dest/.debs"/*.deb | wc -l)
[ "$count" -eq "$(echo "$packages" | wc -l)" ] || { echo "expected $(echo "$packages" | wc -l) .deb files, got $count" >&2; exit 1; }

# --- wheels ----------------------------------------------------------------------------
wheels="pydicom pynetdicom SQLAlchemy alembic Mako pydantic pydantic_core pydantic-settings
python-dotenv typing-inspection annotated-types typing_extensions typer click shellingham
annotated-doc celery kombu amqp billiard vine tzlocal python-dateutil six dicomweb-client retrying
fastapi starlette uvicorn fastapi_offline python-multipart opentelemetry-api"
# (the device's Python has numpy, requests, pillow, jinja2, anyio, h11 and prometheus_client;
# the API in `serve` needs fastapi and uvicorn since the API landed)
pins=()
for name in $wheels; do
    pin=$(grep -i "^${name}==" "$repo/requirements.lock" | head -1)
    [ -n "$pin" ] || { echo "$name is not in requirements.lock" >&2; exit 1; }
    pins+=("$pin")
done
pins+=(tzdata)  # zoneinfo's data, for a device image without /usr/share/zoneinfo
rm -rf "$dest/.whl" && mkdir -p "$dest/.whl"
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dest/.whl" "${pins[@]}" 2>&1 | grep -v '^WARNING: Location' || true
[ "$(ls "$dest/.whl"/*.whl | wc -l)" -eq "${#pins[@]}" ] || { echo "pip download missed a wheel" >&2; exit 1; }

du -sh "$dest/.debs" "$dest/.whl"
tree_kib=$(git -C "$repo" ls-files -z | (cd "$repo" && xargs -0 du -ck 2>/dev/null) | tail -1 | cut -f1)
total_kib=$(( $(du -sk "$dest/.debs" | cut -f1) + $(du -sk "$dest/.whl" | cut -f1) + tree_kib ))
echo "to carry with the tracked tree: $(( total_kib / 1024 )) MiB (limit 64 MiB)"
[ "$total_kib" -lt $(( 56 * 1024 )) ] || { echo "too large to carry" >&2; exit 1; }
