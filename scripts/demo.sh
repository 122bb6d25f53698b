#!/usr/bin/env bash
# The main job without pmem hardware: an ordinary file stands in for pmem.
# Builds pcache, formats /tmp/pcache-demo/pmem.img (1 GiB, sparse) unless it
# already exists (an existing image is never reformatted or removed: if it is
# not a usable cache, attach says why and stops), creates a 1 GiB backing
# file, and runs
# `pcache attach` in the foreground, serving the backing file over NBD on
# 127.0.0.1:10809 until Ctrl-C (the cache stays warm for the next run).
#
#   bash scripts/demo.sh [DIR]      (default /tmp/pcache-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
# Cargo's target directory: CARGO_TARGET_DIR if set (relative to the repo,
# as cargo takes it from here), else ./target.
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
dir="${1:-/tmp/pcache-demo}"
mkdir -p "$dir"
cargo build --release --quiet --bin pcache
pcache="$target/release/pcache"
if [ ! -e "$dir/pmem.img" ]; then
  "$pcache" format "$dir/pmem.img" --size 1G
fi
[ -e "$dir/disk.img" ] || truncate -s 1G "$dir/disk.img"
exec "$pcache" attach "$dir/pmem.img" --backing "$dir/disk.img"
