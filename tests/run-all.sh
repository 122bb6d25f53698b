#!/usr/bin/env bash
# Runs every test of the project: unit, property and end-to-end tests of the
# workspace (the crash campaign with 10 000 crash states), the kill soak,
# the README's demo with its qemu-io line, the real-pmem VM rig, the rig of
# the real Linux dm-pcache module, then each fuzz target for a bounded time.
#
#   bash tests/run-all.sh            # FUZZ_SECONDS=20 per target by default
#   FUZZ_SECONDS=300 PCACHE_CRASH_STATES=100000 KILL_SOAK_KILLS=100 bash tests/run-all.sh
#   PCACHE_SKIP_VM=1 bash tests/run-all.sh   # without the VM rigs (refused when CI=true)
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end NBD tests drive real clients and servers (nbdkit, qemu-nbd),
# and the TLS tests make certificates with openssl; say what is missing up front.
missing=()
for t in qemu-io:qemu-utils qemu-img:qemu-utils qemu-nbd:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin fio:fio nbdkit:nbdkit openssl:openssl; do
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

echo "== the README's first command: scripts/demo.sh, then its qemu-io line"
demo=$(mktemp -d)
bash scripts/demo.sh "$demo" "unix:$demo/demo.sock" >"$demo/log" 2>&1 &
demo_pid=$!
for _ in $(seq 1 1200); do
  grep -q 'SIGINT or SIGTERM stops it' "$demo/log" && break
  kill -0 "$demo_pid" 2>/dev/null || break
  sleep 0.5
done
if ! grep -q 'SIGINT or SIGTERM stops it' "$demo/log"; then
  cat "$demo/log" >&2
  kill "$demo_pid" 2>/dev/null || true
  echo "demo: scripts/demo.sh did not start serving" >&2
  exit 1
fi
out=$(qemu-io -f raw -c 'write -P 0xab 0 1m' -c 'flush' -c 'read -P 0xab 0 1m' "nbd+unix:///disk.img?socket=$demo/demo.sock" 2>&1) || true
kill -INT "$demo_pid"
wait "$demo_pid" || { cat "$demo/log" >&2; echo "demo: attach did not stop cleanly" >&2; exit 1; }
rm -rf "$demo"
case "$out" in
  *failed* | *rror*) echo "$out" >&2; echo "demo: the README's qemu-io line failed" >&2; exit 1 ;;
  *"read 1048576/1048576 bytes"*) echo "demo: served, written, flushed and read back: ok" ;;
  *) echo "$out" >&2; echo "demo: unexpected qemu-io output" >&2; exit 1 ;;
esac

if [ "${PCACHE_SKIP_VM:-}" = 1 ] && [ "${CI:-}" != true ]; then
  echo "== real-pmem VM rig: NOT RUN (PCACHE_SKIP_VM=1)" >&2
else
  echo "== real-pmem VM rig (QEMU guest, emulated NVDIMM, kernel NBD client)"
  bash tests/vm/run.sh
  echo "== dm-pcache VM rig (the real Linux dm-pcache module and pcache on one NVDIMM)"
  bash tests/vm/dm-pcache/run.sh
fi

echo "== fuzz targets, ${FUZZ_SECONDS:-20} s each"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed; installing it (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi
bash fuzz/run.sh "${FUZZ_SECONDS:-20}"
