#!/usr/bin/env bash
# The Debian packages the tests use as real peers: dcmtk (storescu, dsrdump), dicom3tools
# (dciodvfy) and Orthanc (the PACS in end-to-end tests) with its DICOMweb plugin (STOW-RS tests),
# chromium (headless, for the dashboard tests). Installs what is missing when run
# as root; otherwise says what to install.
set -euo pipefail
missing=()
command -v storescu >/dev/null || missing+=(dcmtk)
command -v dsrdump >/dev/null || missing+=(dcmtk)
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v Orthanc >/dev/null || missing+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing+=(orthanc-dicomweb)
command -v redis-server >/dev/null || missing+=(redis-server)  # brokers of the orchestration tests
command -v rabbitmq-server >/dev/null || missing+=(rabbitmq-server)
command -v systemd-analyze >/dev/null || missing+=(systemd)  # verifies deploy/systemd units
command -v chromium >/dev/null || missing+=(chromium)  # the dashboard's browser tests (Playwright)
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing ${missing[*]} ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
