#!/usr/bin/env bash
# Kill soak: `pcache attach` under fio --ioengine=nbd (random writes with
# periodic flushes, each 16 written blocks read back and checked as it goes)
# and a tagging writer (flush every 16 writes) is killed with SIGKILL at
# random moments N times and restarted; after each restart every block's
# last flushed write is read back. Prints kills, writes, flushed blocks
# verified and lost, and fio failures; exits non-zero if a flushed write was
# lost or fio failed (a verify failure, or ending while the server ran).
#
#   bash scripts/kill-soak.sh [KILLS]       (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
# Cargo's target directory: CARGO_TARGET_DIR if set (relative to the repo,
# as cargo takes it from here), else ./target.
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
kills="${1:-20}"
dir="$(mktemp -d)"
trap 'pkill -KILL -f "pcache attach $dir" 2>/dev/null || true; rm -rf "$dir"' EXIT
cargo build --release --quiet --bin pcache --example kill_soak -p pcache-cli
"$target/release/pcache" format "$dir/pmem.img" --size 1G >/dev/null
truncate -s 256M "$dir/disk.img"
fio_arg=fio
if ! command -v fio >/dev/null 2>&1; then
  if [ "${CI:-}" = true ]; then
    echo "kill-soak: fio is missing (apt-get install fio)" >&2
    exit 1
  fi
  echo "kill-soak: fio is missing (apt-get install fio); soaking without its load" >&2
  fio_arg=""
fi
"$target/release/examples/kill_soak" "$target/release/pcache" "$dir" "$kills" $fio_arg
