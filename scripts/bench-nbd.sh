#!/usr/bin/env bash
# NBD front end benchmark: fio --ioengine=nbd, 4 KiB random reads and writes
# at iodepth 1 and 16, against `pcache attach` (warm cache) and against
# `nbdkit memory` of the same size on the same transport (a Unix socket),
# in one run. Prints IOPS and the ratio.
#
#   bash scripts/bench-nbd.sh [SECONDS_PER_JOB]     (default 10)
#
# First table: the pmem device is a file in /dev/shm treated as pmem
# (PCACHE_FORCE_PMEM=1: cache-line write-back and fences, as on real pmem,
# without msync), and so is the backing file, so that writeback costs what
# writing memory costs, as nbdkit memory's writes do.
#
# Second table: the README's demo configuration, the pmem device an ordinary
# file on disk (made durable by msync, with group commit) and the backing
# file beside it, against `nbdkit file` of a file on the same disk (which
# also makes data durable only at a flush). Set BENCH_DISK_DIR to choose the
# disk (default: the system's temporary directory).
#
# Needs fio, nbdkit and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
# Cargo's target directory: CARGO_TARGET_DIR if set (relative to the repo,
# as cargo takes it from here), else ./target.
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
secs="${1:-10}"
size=256M
work="$(mktemp -d)"
shm="$(mktemp -d /dev/shm/pcache-bench.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$work" "$shm"
}
trap cleanup EXIT

cargo build --release --quiet --bin pcache
pcache="$target/release/pcache"
"$pcache" format "$shm/pmem.img" --size 2G >/dev/null
truncate -s "$size" "$shm/disk.img"

PCACHE_FORCE_PMEM=1 PCACHE_LOG=warn "$pcache" attach "$shm/pmem.img" --backing "$shm/disk.img" \
  --listen "unix:$work/pcache.sock" >"$work/attach.log" 2>&1 &
pids+=($!)
nbdkit --foreground --unix "$work/nbdkit.sock" memory "$size" >"$work/nbdkit.log" 2>&1 &
pids+=($!)
for s in "$work/pcache.sock" "$work/nbdkit.sock"; do
  for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.1; done
done
pcache_uri="nbd+unix:///disk.img?socket=$work/pcache.sock"
nbdkit_uri="nbd+unix:///?socket=$work/nbdkit.sock"

# Warm both: write every block once, so that pcache's reads all hit.
for uri in "$pcache_uri" "$nbdkit_uri"; do
  fio --name=warm --ioengine=nbd --uri="$uri" --rw=write --bs=1M --size="$size" --iodepth=4 \
    --output-format=terse >/dev/null
done

iops() { # uri rw depth
  fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --size="$size" --iodepth="$3" \
    --time_based --runtime="$secs" --output-format=json |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]; print(int(j["read"]["iops"] + j["write"]["iops"]))'
}

printf '%-22s %12s %14s %8s\n' "4 KiB job" "pcache IOPS" "nbdkit memory" "ratio"
for rw in randread randwrite; do
  for depth in 1 16; do
    a=$(iops "$pcache_uri" "$rw" "$depth")
    b=$(iops "$nbdkit_uri" "$rw" "$depth")
    printf '%-22s %12d %14d %7.2fx\n' "$rw iodepth $depth" "$a" "$b" "$(python3 -c "print($a/$b)")"
  done
done
echo "(target >= 0.8x; $secs s per job, $size export, $(nproc) CPUs)"

# ---- the demo configuration: ordinary files on disk
disk="$(mktemp -d "${BENCH_DISK_DIR:-${TMPDIR:-/tmp}}/pcache-bench-disk.XXXXXX")"
trap 'cleanup; rm -rf "$disk"' EXIT
"$pcache" format "$disk/pmem.img" --size 2G >/dev/null
truncate -s "$size" "$disk/disk.img" "$disk/nbdkit.img"
PCACHE_LOG=warn "$pcache" attach "$disk/pmem.img" --backing "$disk/disk.img" \
  --listen "unix:$work/pcache-disk.sock" >"$work/attach-disk.log" 2>&1 &
pids+=($!)
nbdkit --foreground --unix "$work/nbdkit-file.sock" file "$disk/nbdkit.img" >"$work/nbdkit-file.log" 2>&1 &
pids+=($!)
for s in "$work/pcache-disk.sock" "$work/nbdkit-file.sock"; do
  for _ in $(seq 100); do [ -S "$s" ] && break; sleep 0.1; done
done
pcache_uri="nbd+unix:///disk.img?socket=$work/pcache-disk.sock"
nbdkit_uri="nbd+unix:///?socket=$work/nbdkit-file.sock"
echo
echo "pmem and backing: ordinary files in $disk ($(head -1 "$work/attach-disk.log" | sed 's/^[^:]*: //'))"
printf '%-22s %12s %14s %8s\n' "4 KiB job" "pcache IOPS" "nbdkit file" "ratio"
for depth in 1 16; do
  a=$(iops "$pcache_uri" randwrite "$depth")
  b=$(iops "$nbdkit_uri" randwrite "$depth")
  printf '%-22s %12d %14d %7.2fx\n' "randwrite iodepth $depth" "$a" "$b" "$(python3 -c "print($a/$b)")"
done
echo "(target >= 1.0x at iodepth 16; $secs s per job)"
