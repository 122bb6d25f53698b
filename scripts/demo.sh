#!/usr/bin/env bash
# The main job without pmem hardware: an ordinary file stands in for pmem.
# Builds pcache, formats a 1 GiB sparse file, caches a 256 MiB backing file
# on it, inspects and checks the device, then detaches the backing file.
#
#   bash scripts/demo.sh [DIR]      (default: a new directory under /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-$(mktemp -d /tmp/pcache-demo.XXXXXX)}"
mkdir -p "$dir"
run() { echo "+ $*"; "$@"; }

run cargo build --release --quiet --bin pcache --example demo -p pcache-cli -p pcache-pmem
pcache=target/release/pcache
run "$pcache" format "$dir/pmem.img" --size 1G --force
run truncate -s 256M "$dir/disk.img"
run target/release/examples/demo "$dir/pmem.img" "$dir/disk.img"
run "$pcache" inspect "$dir/pmem.img"
run "$pcache" check "$dir/pmem.img"
run "$pcache" detach "$dir/pmem.img" --backing "$dir/disk.img"
run "$pcache" inspect "$dir/pmem.img"
echo "The device and the backing file are in $dir."
