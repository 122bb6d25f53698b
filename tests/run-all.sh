#!/usr/bin/env bash
# Runs every test of the project: unit, property and end-to-end tests of the
# workspace (the crash campaign with 10 000 crash states), the kill soak,
# the real-pmem VM rig, then each fuzz target for a bounded time.
#
#   bash tests/run-all.sh            # FUZZ_SECONDS=20 per target by default
#   FUZZ_SECONDS=300 PCACHE_CRASH_STATES=100000 KILL_SOAK_KILLS=100 bash tests/run-all.sh
#   PCACHE_SKIP_VM=1 bash tests/run-all.sh   # without the VM rig (refused when CI=true)
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end NBD tests drive real clients; say what is missing up front.
missing=()
for t in qemu-io:qemu-utils qemu-img:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin fio:fio; do
  command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
if [ "${#missing[@]}" -ne 0 ]; then
  echo "missing NBD clients; install them with: apt-get install ${missing[*]}" >&2
  exit 1
fi

echo "== cargo test (workspace, all features; crash campaign: ${PCACHE_CRASH_STATES:-10000} states)"
PCACHE_CRASH_STATES="${PCACHE_CRASH_STATES:-10000}" cargo test --workspace --all-features

echo "== kill soak: ${KILL_SOAK_KILLS:-10} kills"
bash scripts/kill-soak.sh "${KILL_SOAK_KILLS:-10}"

if [ "${PCACHE_SKIP_VM:-}" = 1 ] && [ "${CI:-}" != true ]; then
  echo "== real-pmem VM rig: NOT RUN (PCACHE_SKIP_VM=1)" >&2
else
  echo "== real-pmem VM rig (QEMU guest, emulated NVDIMM, kernel NBD client)"
  bash tests/vm/run.sh
fi

echo "== fuzz targets, ${FUZZ_SECONDS:-20} s each"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed; installing it (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi
bash fuzz/run.sh "${FUZZ_SECONDS:-20}"
